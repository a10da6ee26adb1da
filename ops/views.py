"""MiM's views (levels 1-3) of a batch of crops: torch references and one fused Triton kernel.

    reference(crop, octants, picks, p, masks=None)   # downsample2x + octant_views + patch_views (+ masks)
    fused(crop, octants, picks, p, masks=None)       # Triton: _views_kernel, all three levels in one launch

crop: (N, C, 2S, 2S, 2S); octants: (N, K2) int, the masked level-1 octants that become level-2 views (octant
``o = 4*od + 2*oh + ow``); picks: (N, K2, K3) int, per level-2 view the tokens whose patches become level-3
views; p: patch size. Results ``(N, C, S, S, S)``, ``(N*K2, ...)``, ``(N*K2*K3, ...)`` in ``(n, k2, k3)`` order,
the order of :mod:`mim_scale.model.views`. Trilinear resampling is ``F.interpolate(..., mode="trilinear",
align_corners=False)``. What the fusion removes: the permuted crop copies, the stack of views and the separate
mask pass (one write per output voxel). No gradient (crops are data): there is no autograd Function, and
``fused`` refuses a crop that requires grad (the dispatcher sends it to the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import Kernels, cdiv, check_ids, next_pow2, tl
from .patches import upsample_token_mask


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


def reference(crop: torch.Tensor, octants: torch.Tensor, picks: torch.Tensor, p: int,
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


def _views_kernel(crop_ptr, out_ptr, oct_ptr, pick_ptr, mask_ptr, N, K2, K3, scale,
                  C: tl.constexpr, S: tl.constexpr, P: tl.constexpr, HAS_MASK: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Every MiM view of a batch of crops in one pass over the output.

    Program (b, v) writes voxels [b*BLOCK, (b+1)*BLOCK) of view v, where views are numbered level 1
    (n), then level 2 (n*K2 + k), then level 3 ((n*K2 + k)*K3 + j), as in reference.make_views. The crop
    is (N, C, 2S, 2S, 2S); level 1 averages 2x2x2 blocks (trilinear at factor 1/2), level 2 copies an
    octant, level 3 interpolates a P^3 patch trilinearly (align_corners=False) up to S^3.
    """
    b = tl.program_id(0)
    vid = tl.program_id(1).to(tl.int64)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    inb = offs < C * S * S * S
    x = offs % S
    y = (offs // S) % S
    z = (offs // (S * S)) % S
    c = (offs // (S * S * S)).to(tl.int64)
    S2 = 2 * S
    n1 = N
    n2 = N * K2
    if vid < n1:
        src = crop_ptr + vid * (C * S2 * S2 * S2) + c * (S2 * S2 * S2)
        z2 = 2 * z
        y2 = 2 * y
        x2 = 2 * x
        a000 = tl.load(src + (z2 * S2 + y2) * S2 + x2, mask=inb, other=0.0).to(tl.float32)
        a001 = tl.load(src + (z2 * S2 + y2) * S2 + x2 + 1, mask=inb, other=0.0).to(tl.float32)
        a010 = tl.load(src + (z2 * S2 + y2 + 1) * S2 + x2, mask=inb, other=0.0).to(tl.float32)
        a011 = tl.load(src + (z2 * S2 + y2 + 1) * S2 + x2 + 1, mask=inb, other=0.0).to(tl.float32)
        a100 = tl.load(src + ((z2 + 1) * S2 + y2) * S2 + x2, mask=inb, other=0.0).to(tl.float32)
        a101 = tl.load(src + ((z2 + 1) * S2 + y2) * S2 + x2 + 1, mask=inb, other=0.0).to(tl.float32)
        a110 = tl.load(src + ((z2 + 1) * S2 + y2 + 1) * S2 + x2, mask=inb, other=0.0).to(tl.float32)
        a111 = tl.load(src + ((z2 + 1) * S2 + y2 + 1) * S2 + x2 + 1, mask=inb, other=0.0).to(tl.float32)
        val = (((a000 + a001) + (a010 + a011)) + ((a100 + a101) + (a110 + a111))) * 0.125
    elif vid < n1 + n2:
        j = vid - n1
        n = j // K2
        o = tl.load(oct_ptr + j).to(tl.int64)
        oz = (o // 4) * S
        oy = ((o // 2) % 2) * S
        ox = (o % 2) * S
        src = crop_ptr + n * (C * S2 * S2 * S2) + c * (S2 * S2 * S2)
        val = tl.load(src + ((oz + z) * S2 + oy + y) * S2 + ox + x, mask=inb, other=0.0).to(tl.float32)
    else:
        j = vid - n1 - n2
        n = j // (K2 * K3)
        o = tl.load(oct_ptr + j // K3).to(tl.int64)
        t = tl.load(pick_ptr + j).to(tl.int64)
        G = S // P
        pz = (o // 4) * S + (t // (G * G)) * P
        py = ((o // 2) % 2) * S + ((t // G) % G) * P
        px = (o % 2) * S + (t % G) * P
        src = crop_ptr + n * (C * S2 * S2 * S2) + c * (S2 * S2 * S2)
        # source coordinate of each output voxel, as torch's align_corners=False linear modes compute it
        fz = tl.maximum((z.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
        fy = tl.maximum((y.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
        fx = tl.maximum((x.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
        iz0 = fz.to(tl.int32)
        iy0 = fy.to(tl.int32)
        ix0 = fx.to(tl.int32)
        iz1 = tl.minimum(iz0 + 1, P - 1)
        iy1 = tl.minimum(iy0 + 1, P - 1)
        ix1 = tl.minimum(ix0 + 1, P - 1)
        lz1 = fz - iz0.to(tl.float32)
        ly1 = fy - iy0.to(tl.float32)
        lx1 = fx - ix0.to(tl.float32)
        lz0 = 1.0 - lz1
        ly0 = 1.0 - ly1
        lx0 = 1.0 - lx1
        rz0 = (pz + iz0) * S2
        rz1 = (pz + iz1) * S2
        ry0 = py + iy0
        ry1 = py + iy1
        cx0 = px + ix0
        cx1 = px + ix1
        b000 = tl.load(src + (rz0 + ry0) * S2 + cx0, mask=inb, other=0.0).to(tl.float32)
        b001 = tl.load(src + (rz0 + ry0) * S2 + cx1, mask=inb, other=0.0).to(tl.float32)
        b010 = tl.load(src + (rz0 + ry1) * S2 + cx0, mask=inb, other=0.0).to(tl.float32)
        b011 = tl.load(src + (rz0 + ry1) * S2 + cx1, mask=inb, other=0.0).to(tl.float32)
        b100 = tl.load(src + (rz1 + ry0) * S2 + cx0, mask=inb, other=0.0).to(tl.float32)
        b101 = tl.load(src + (rz1 + ry0) * S2 + cx1, mask=inb, other=0.0).to(tl.float32)
        b110 = tl.load(src + (rz1 + ry1) * S2 + cx0, mask=inb, other=0.0).to(tl.float32)
        b111 = tl.load(src + (rz1 + ry1) * S2 + cx1, mask=inb, other=0.0).to(tl.float32)
        val = (lz0 * (ly0 * (lx0 * b000 + lx1 * b001) + ly1 * (lx0 * b010 + lx1 * b011))
               + lz1 * (ly0 * (lx0 * b100 + lx1 * b101) + ly1 * (lx0 * b110 + lx1 * b111)))
    if HAS_MASK:
        G2 = S // P
        tok = ((z // P) * G2 + y // P) * G2 + x // P
        mk = tl.load(mask_ptr + vid * (G2 * G2 * G2) + tok, mask=inb, other=0.0)
        val = val * (1.0 - mk)
    tl.store(out_ptr + vid * (C * S * S * S) + offs, val.to(out_ptr.dtype.element_ty), mask=inb)


KERNELS = Kernels(views=_views_kernel)


def views_launch(crop: torch.Tensor, octants: torch.Tensor, picks: torch.Tensor, p: int,
                 masks: torch.Tensor | None) -> torch.Tensor:
    """crop: (N, C, 2S, 2S, 2S); octants: (N*K2,) int64; picks: (N*K2*K3,) int64; masks: (V, L) fp32 or None
    -> (V, C, S, S, S) with V = N (1 + K2 + K2*K3), the views of all levels in make_views' order."""
    n, c, d, _, _ = crop.shape
    s = d // 2
    k2 = octants.numel() // n if n else 0
    k3 = picks.numel() // octants.numel() if octants.numel() else 0
    total = n * (1 + k2 + k2 * k3)
    out = torch.empty((total, c, s, s, s), device=crop.device, dtype=crop.dtype)
    if out.numel() == 0:
        return out
    # 4 voxels per thread: the trilinear branch needs ~150 registers/thread at 8 voxels (sm_90 cubin),
    # ~66 at 4, which keeps enough warps resident to hide memory latency
    block = min(next_pow2(c * s**3), 1024)
    # Dummy pointers for absent inputs: the kernel never dereferences them (branch or constexpr off).
    oct_arg = octants if octants.numel() else crop
    pick_arg = picks if picks.numel() else crop
    mask_arg = masks if masks is not None else crop
    grid = (cdiv(c * s**3, block), total)
    KERNELS.for_tensor(crop).views[grid](crop, out, oct_arg, pick_arg, mask_arg, n, max(k2, 1), max(k3, 1),
                                         float(p) / float(s), C=c, S=s, P=p, HAS_MASK=masks is not None,
                                         BLOCK=block, num_warps=max(1, block // 128))
    return out


@torch.compiler.disable
def fused(crop: torch.Tensor, octants: torch.Tensor, picks: torch.Tensor, p: int,
          masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused :func:`reference`: one kernel writes all three levels' views (and applies the token
    masks) reading the crop once for level 1, once per level-2 octant and per level-3 patch.

    The three results are consecutive slices of one buffer (each contiguous). No gradient.
    """
    _check_view_args(crop, octants, picks, p)
    if crop.requires_grad:
        raise ValueError("make_views' fused kernel gives no gradient; crop requires grad (use the reference)")
    n, _, d, _, _ = crop.shape
    s = d // 2
    k2, k3 = octants.shape[1], picks.shape[2]
    check_ids(octants, 8, "make_views octants")
    check_ids(picks, (s // p) ** 3, "make_views picks")
    mask_all = None
    if masks is not None:
        counts = (n, n * k2, n * k2 * k3)
        length = (s // p) ** 3
        for level, (m, rows) in enumerate(zip(masks, counts), start=1):
            if tuple(m.shape) != (rows, length):
                raise ValueError(f"make_views level-{level} mask must be ({rows}, {length}), got {tuple(m.shape)}")
        mask_all = torch.cat([m.to(device=crop.device, dtype=torch.float32) for m in masks]).contiguous()
    out = views_launch(crop.contiguous(), octants.reshape(-1).long().contiguous(),
                       picks.reshape(-1).long().contiguous(), p, mask_all)
    return out[:n], out[n:n + n * k2], out[n + n * k2:]
