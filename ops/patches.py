"""Token/patch layout shared by every op: patchify, its inverse, the normalised target, voxel masks.

Conventions (shared by every kernel in this package):
- volumes are ``(N, C, D, H, W)`` with D, H, W divisible by the patch size ``p``;
- tokens are numbered in raster order over the ``(D/p, H/p, W/p)`` grid (depth slowest);
- a patch vector lists its voxels in ``(pd, ph, pw, c)`` order, length ``p**3 * C``;
- ``mask`` is ``(N, L)`` with 1 at *masked* tokens and 0 at visible ones (MAE's convention).

Plain torch, no kernel: these are layout helpers the references and the model use.
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


def upsample_token_mask(keep: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """keep: (N, L) with 1 at visible tokens -> (N, 1, size, size, size) voxel mask (nearest)."""
    n = keep.shape[0]
    m = keep.reshape(n, 1, grid, grid, grid)
    r = size // grid
    return m.repeat_interleave(r, 2).repeat_interleave(r, 3).repeat_interleave(r, 4)
