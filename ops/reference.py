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
