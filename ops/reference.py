"""Plain-torch reference versions of the masking and patching operations.

These are the ground truth that every fused kernel in this package is tested against, and the
CPU path of the dispatcher. They are written to be read, not to be fast.

Conventions (shared by every kernel):
- volumes are ``(N, C, D, H, W)`` with D = H = W divisible by the patch size ``p``;
- tokens are numbered in raster order over the ``(D/p, H/p, W/p)`` grid (depth slowest);
- a patch vector lists its voxels in ``(pd, ph, pw, c)`` order, length ``p**3 * C``;
- ``mask`` is ``(N, L)`` with 1 at *masked* tokens and 0 at visible ones (MAE's convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(vol: torch.Tensor, p: int) -> torch.Tensor:
    """vol: (N, C, D, H, W) -> patches: (N, L, p^3 * C), L = (D/p)(H/p)(W/p)."""
    n, c, d, h, w = vol.shape
    if d % p or h % p or w % p:
        raise ValueError(f"volume {tuple(vol.shape[2:])} is not divisible by patch size {p}")
    x = vol.reshape(n, c, d // p, p, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # n, gd, gh, gw, pd, ph, pw, c
    return x.reshape(n, (d // p) * (h // p) * (w // p), p**3 * c)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int, int], channels: int = 1) -> torch.Tensor:
    """patches: (N, L, p^3 * C) -> vol: (N, C, gd*p, gh*p, gw*p). Inverse of :func:`patchify`."""
    n = patches.shape[0]
    gd, gh, gw = grid
    x = patches.reshape(n, gd, gh, gw, p, p, p, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # n, c, gd, pd, gh, ph, gw, pw
    return x.reshape(n, channels, gd * p, gh * p, gw * p)


def norm_pix_target(vol: torch.Tensor, p: int, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised target: (patch - mean) / sqrt(var + eps); (N, L, p^3 * C).

    The variance is the biased (population) variance over the patch's voxels, as in MAE.
    """
    target = patchify(vol, p).float()
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, unbiased=False, keepdim=True)
    return (target - mean) / torch.sqrt(var + eps)


def masked_norm_pix_mse(pred: torch.Tensor, vol: torch.Tensor, mask: torch.Tensor, p: int,
                        eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error against the normalised patches, over masked tokens only.

    pred: (N, L, p^3 * C) decoder output; vol: (N, C, D, H, W) the level's input volume;
    mask: (N, L), 1 = masked. Returns a scalar: the mean over masked tokens of the per-token
    mean squared error (0 when nothing is masked).
    """
    target = norm_pix_target(vol, p, eps)
    per_token = (pred.float() - target).pow(2).mean(dim=-1)  # (N, L)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (N, L, E), ids: (N, K) int64 -> (N, K, E): the tokens at ``ids``, in that order."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(visible: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, length: int) -> torch.Tensor:
    """Place visible tokens back on the full grid, ``fill`` (E,) at every other position.

    visible: (N, K, E); ids_keep: (N, K) -> (N, length, E).
    """
    n, _, e = visible.shape
    out = fill.to(visible.dtype).expand(n, length, e).clone()
    return out.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, e), visible)


def upsample_token_mask(keep: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """keep: (N, L) with 1 at visible tokens -> (N, 1, size, size, size) voxel mask (nearest)."""
    n = keep.shape[0]
    m = keep.reshape(n, 1, grid, grid, grid)
    r = size // grid
    return m.repeat_interleave(r, 2).repeat_interleave(r, 3).repeat_interleave(r, 4)


# ---------------------------------------------------------------------------------------------------
# View construction (MiM levels 1-3). Octants are numbered o = 4*od + 2*oh + ow (depth slowest, the
# same raster order as tokens), so octant o of a crop is the full-resolution region of the tokens in
# octant o of the level-1 token grid.
# ---------------------------------------------------------------------------------------------------


def octant_origin(o: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """o: int tensor of octant indices in [0, 8) -> (z0, y0, x0) voxel origins, each like ``o``."""
    return (o // 4) * size, ((o // 2) % 2) * size, (o % 2) * size


def downsample2x(crop: torch.Tensor) -> torch.Tensor:
    """Level-1 view. crop: (N, C, 2S, 2S, 2S) -> (N, C, S, S, S), trilinear (align_corners=False).

    For an exact factor of 2 this is the mean of each 2x2x2 block.
    """
    n, c, d, h, w = crop.shape
    if d % 2 or h % 2 or w % 2:
        raise ValueError(f"crop {tuple(crop.shape[2:])} must have even sides to be downsampled 2x")
    return F.interpolate(crop, size=(d // 2, h // 2, w // 2), mode="trilinear", align_corners=False)


def octant_views(crop: torch.Tensor, octants: torch.Tensor) -> torch.Tensor:
    """Level-2 views. crop: (N, C, 2S, 2S, 2S); octants: (N, K2) int in [0, 8) -> (N*K2, C, S, S, S).

    View ``n*K2 + k`` is octant ``octants[n, k]`` of crop ``n`` at full resolution.
    """
    n, c, d, _, _ = crop.shape
    s = d // 2
    x = crop.reshape(n, c, 2, s, 2, s, 2, s).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n, 8, c, s, s, s)
    rows = torch.arange(n, device=crop.device).unsqueeze(1)
    return x[rows, octants.long()].reshape(-1, c, s, s, s)


def patch_views(crop: torch.Tensor, octants: torch.Tensor, picks: torch.Tensor, p: int) -> torch.Tensor:
    """Level-3 views. crop: (N, C, 2S, 2S, 2S); octants: (N, K2); picks: (N, K2, K3) token indices in
    [0, (S/p)^3) of each level-2 view's grid -> (N*K2*K3, C, S, S, S).

    View ``(n*K2 + k)*K3 + j`` is the p^3 patch ``picks[n, k, j]`` of level-2 view ``(n, k)``, upsampled by
    S/p with trilinear interpolation (align_corners=False).
    """
    n, c, d, _, _ = crop.shape
    s = d // 2
    g = s // p
    o = octants.long().unsqueeze(-1)  # (N, K2, 1)
    t = picks.long()
    # token of the crop's own (2g)^3 grid that the picked level-2 token covers
    cz = (o // 4) * g + t // (g * g)
    cy = ((o // 2) % 2) * g + (t // g) % g
    cx = (o % 2) * g + t % g
    idx = (cz * (2 * g) + cy) * (2 * g) + cx  # (N, K2, K3)
    x = crop.reshape(n, c, 2 * g, p, 2 * g, p, 2 * g, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    x = x.reshape(n, 8 * g**3, c, p, p, p)
    rows = torch.arange(n, device=crop.device).view(n, 1, 1)
    patches = x[rows, idx].reshape(-1, c, p, p, p)
    if patches.shape[0] == 0:
        return crop.new_empty((0, c, s, s, s))
    return F.interpolate(patches, size=(s, s, s), mode="trilinear", align_corners=False)


def apply_token_mask(views: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """views: (V, C, S, S, S); mask: (V, L) with 1 = masked -> views with masked tokens' voxels zeroed."""
    v, _, s, _, _ = views.shape
    keep = 1.0 - mask.to(torch.float32)
    return (views.float() * upsample_token_mask(keep, s // p, s)).to(views.dtype)


def make_views(crop: torch.Tensor, octants: torch.Tensor, picks: torch.Tensor, p: int,
               masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All MiM views of a batch of crops.

    crop: (N, C, 2S, 2S, 2S); octants: (N, K2) int, the masked level-1 octants that become level-2 views;
    picks: (N, K2, K3) int, per level-2 view the tokens whose patches become level-3 views; p: patch size.
    masks: optional (m1 (N, L), m2 (N*K2, L), m3 (N*K2*K3, L)), 1 = masked, L = (S/p)^3; when given, the
    voxels of masked tokens are set to 0 in the returned views.
    Returns (v1 (N, C, S, S, S), v2 (N*K2, C, S, S, S), v3 (N*K2*K3, C, S, S, S)). K2 or K3 may be 0.
    """
    _check_view_args(crop, octants, picks, p)
    v1 = downsample2x(crop)
    v2 = octant_views(crop, octants)
    v3 = patch_views(crop, octants, picks, p)
    if masks is not None:
        v1, v2, v3 = (apply_token_mask(v, m, p) for v, m in zip((v1, v2, v3), masks))
    return v1, v2, v3


def _check_view_args(crop: torch.Tensor, octants: torch.Tensor, picks: torch.Tensor, p: int) -> None:
    if crop.dim() != 5 or not (crop.shape[2] == crop.shape[3] == crop.shape[4]):
        raise ValueError(f"crop must be (N, C, 2S, 2S, 2S), got {tuple(crop.shape)}")
    d = crop.shape[2]
    if d % 2 or (d // 2) % p:
        raise ValueError(f"crop side {d} must be 2 x a multiple of the patch size {p}")
    n = crop.shape[0]
    if octants.dim() != 2 or octants.shape[0] != n:
        raise ValueError(f"octants must be (N={n}, K2), got {tuple(octants.shape)}")
    if picks.dim() != 3 or tuple(picks.shape[:2]) != tuple(octants.shape):
        raise ValueError(f"picks must be (N, K2, K3) = ({n}, {octants.shape[1]}, K3), got {tuple(picks.shape)}")
