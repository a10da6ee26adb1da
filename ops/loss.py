"""Masked normalised-pixel MSE (MAE's loss): torch reference, Triton kernels, autograd Function.

    reference(pred, vol, mask, p, eps)   # plain torch: patchify + mean/var + normalise + masked MSE
    fused(pred, vol, mask, p, eps)       # Triton: _mse_kernel (forward and backward), autograd included

pred: (N, L, p^3 C) decoder output; vol: (N, C, D, H, W) the level's input volume; mask: (N, L), 1 = masked.
Returns an fp32 scalar: the mean over masked tokens of the per-token mean squared error (0 when nothing is
masked). The fusion never builds the patchified fp32 target: visible tokens read nothing, and the backward
recomputes the patch statistics from ``vol`` instead of saving targets. ``fused`` differentiates w.r.t.
``pred`` only (the target is a constant, as in MAE); the dispatcher sends a ``vol`` that requires grad to the
reference.
"""

from __future__ import annotations

import torch

from ._triton import Kernels, cdiv, next_pow2, tl, warps
from .patches import norm_pix_target

# The largest per-token block held in registers at once; longer patch vectors are processed in chunks.
MAX_PATCH_BLOCK = 8192


def reference(pred: torch.Tensor, vol: torch.Tensor, mask: torch.Tensor, p: int, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error against the normalised patches, over masked tokens only (see the module docstring)."""
    target = norm_pix_target(vol, p, eps)
    per_token = (pred.float() - target).pow(2).mean(dim=-1)  # (N, L)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _mse_kernel(pred_ptr, vol_ptr, mask_ptr, scale_ptr, out_ptr, L, GH, GW, s_n, s_c, s_d, s_h, eps,
                C: tl.constexpr, P: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr, NCHUNK: tl.constexpr,
                BACKWARD: tl.constexpr):
    """One program per token; t is the token's patch read straight from the volume, normalised on the fly
    (tn = (t - mean(t)) / sqrt(var(t) + eps)), so no target is ever stored. Visible tokens (mask 0) read nothing.

    Forward (``BACKWARD`` False): out[row] = mask[row] * mean_e (pred[row, e] - tn_e)^2; ``scale_ptr`` unused.
    Backward: out[row, e] = scale * mask[row] * (pred[row, e] - tn_e), scale = 2 g / (E * count); every row is
    written (zeros for visible tokens), so the gradient buffer needs no separate zero fill.
    One body for both passes: kernel bodies may call only Triton builtins (``_triton``), and the constexpr
    branch compiles each pass on its own.
    """
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(mask_ptr + row)
    # visible tokens get an empty range, so their loads touch no memory
    lim = (m != 0.0).to(tl.int32) * E
    n = row // L
    tok = row % L
    gw = tok % GW
    gh = (tok // GW) % GH
    gd = tok // (GW * GH)
    base = n * s_n + gd * P * s_d + gh * P * s_h + gw * P
    pred_row = pred_ptr + row * E
    grad_row = out_ptr + row * E
    e0 = tl.arange(0, BLOCK)
    if NCHUNK == 1:
        valid = e0 < lim
        v = e0 // C
        off = base + (e0 % C) * s_c + (v // (P * P)) * s_d + ((v // P) % P) * s_h + v % P
        t = tl.load(vol_ptr + off, mask=valid, other=0.0).to(tl.float32)
        mean = tl.reduce(t, 0, tl.standard._sum_combine) / E
        d = tl.where(valid, t - mean, 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.reduce(d * d, 0, tl.standard._sum_combine) / E + eps)
        x = tl.load(pred_row + e0, mask=valid, other=0.0).to(tl.float32)
        diff = tl.where(valid, x - d * rstd, 0.0)
        if BACKWARD:
            g = tl.load(scale_ptr) * m * diff
            tl.store(grad_row + e0, g.to(out_ptr.dtype.element_ty), mask=e0 < E)
        else:
            tl.store(out_ptr + row, tl.reduce(diff * diff, 0, tl.standard._sum_combine) / E * m)
    else:
        s1 = tl.full([BLOCK], 0.0, tl.float32)
        for i in range(NCHUNK):
            e = i * BLOCK + e0
            valid = e < lim
            v = e // C
            off = base + (e % C) * s_c + (v // (P * P)) * s_d + ((v // P) % P) * s_h + v % P
            s1 += tl.load(vol_ptr + off, mask=valid, other=0.0).to(tl.float32)
        mean = tl.reduce(s1, 0, tl.standard._sum_combine) / E
        s2 = tl.full([BLOCK], 0.0, tl.float32)
        for i in range(NCHUNK):
            e = i * BLOCK + e0
            valid = e < lim
            v = e // C
            off = base + (e % C) * s_c + (v // (P * P)) * s_d + ((v // P) % P) * s_h + v % P
            t = tl.load(vol_ptr + off, mask=valid, other=0.0).to(tl.float32)
            d = tl.where(valid, t - mean, 0.0)
            s2 += d * d
        rstd = 1.0 / tl.sqrt_rn(tl.reduce(s2, 0, tl.standard._sum_combine) / E + eps)
        s3 = tl.full([BLOCK], 0.0, tl.float32)
        for i in range(NCHUNK):
            e = i * BLOCK + e0
            valid = e < lim
            v = e // C
            off = base + (e % C) * s_c + (v // (P * P)) * s_d + ((v // P) % P) * s_h + v % P
            t = tl.load(vol_ptr + off, mask=valid, other=0.0).to(tl.float32)
            x = tl.load(pred_row + e, mask=valid, other=0.0).to(tl.float32)
            diff = tl.where(valid, x - (t - mean) * rstd, 0.0)
            if BACKWARD:
                g = tl.load(scale_ptr) * m * diff
                tl.store(grad_row + e, g.to(out_ptr.dtype.element_ty), mask=e < E)
            else:
                s3 += diff * diff
        if not BACKWARD:
            tl.store(out_ptr + row, tl.reduce(s3, 0, tl.standard._sum_combine) / E * m)


KERNELS = Kernels(mse=_mse_kernel)


def _mse_meta(vol: torch.Tensor, p: int) -> dict:
    n, c, d, h, w = vol.shape
    e = p**3 * c
    block = min(next_pow2(e), MAX_PATCH_BLOCK)
    return dict(GH=h // p, GW=w // p, s_n=c * d * h * w, s_c=d * h * w, s_d=h * w, s_h=w,
                C=c, P=p, E=e, BLOCK=block, NCHUNK=cdiv(e, block))


def mse_forward(pred: torch.Tensor, vol: torch.Tensor, mask: torch.Tensor, p: int, eps: float) -> torch.Tensor:
    """pred: (N, L, E); vol: (N, C, D, H, W); mask: (N, L) fp32 -> per-token masked error (N, L) fp32."""
    n, length, _ = pred.shape
    out = torch.empty((n, length), device=pred.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    meta = _mse_meta(vol, p)
    KERNELS.for_tensor(pred).mse[(n * length,)](pred, vol, mask, mask, out, length, eps=float(eps),  # no scale
                                                num_warps=warps(meta["BLOCK"]), BACKWARD=False, **meta)
    return out


def mse_backward(pred: torch.Tensor, vol: torch.Tensor, mask: torch.Tensor, p: int, eps: float,
                 scale: torch.Tensor) -> torch.Tensor:
    """Gradient of sum(per-token error) * scale w.r.t. pred; scale: 1-element fp32 = 2 g / (E * count)."""
    n, length, _ = pred.shape
    grad = torch.empty_like(pred)
    if grad.numel() == 0:
        return grad
    meta = _mse_meta(vol, p)
    KERNELS.for_tensor(pred).mse[(n * length,)](pred, vol, mask, scale, grad, length, eps=float(eps),
                                                num_warps=warps(meta["BLOCK"]), BACKWARD=True, **meta)
    return grad


def _check_mse_args(pred: torch.Tensor, vol: torch.Tensor, mask: torch.Tensor, p: int) -> None:
    if vol.dim() != 5:
        raise ValueError(f"vol must be (N, C, D, H, W), got {tuple(vol.shape)}")
    n, c, d, h, w = vol.shape
    if d % p or h % p or w % p:
        raise ValueError(f"volume {tuple(vol.shape[2:])} is not divisible by patch size {p}")
    length = (d // p) * (h // p) * (w // p)
    if tuple(pred.shape) != (n, length, p**3 * c):
        raise ValueError(f"pred must be (N, L, p^3*C) = ({n}, {length}, {p**3 * c}) for vol {tuple(vol.shape)} "
                         f"and p={p}, got {tuple(pred.shape)}")
    if tuple(mask.shape) != (n, length):
        raise ValueError(f"mask must be (N, L) = ({n}, {length}), got {tuple(mask.shape)}")
    if pred.device != vol.device or pred.device != mask.device:
        raise ValueError(f"pred, vol and mask must share a device, got {pred.device}, {vol.device}, {mask.device}")


class MaskedNormPixMSE(torch.autograd.Function):
    """Autograd of the fused loss: gradient w.r.t. pred only (vol and mask are constants)."""

    @staticmethod
    def forward(ctx, pred, vol, mask, p, eps):
        pred = pred.contiguous()
        vol = vol.contiguous()
        mask_f = mask.to(torch.float32).contiguous()
        per_token = mse_forward(pred, vol, mask_f, p, eps)
        count = mask_f.sum().clamp(min=1.0)
        ctx.save_for_backward(pred, vol, mask_f, count)
        ctx.p, ctx.eps = p, eps
        return per_token.sum() / count

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        pred, vol, mask_f, count = ctx.saved_tensors
        scale = (grad_out.float() * 2.0 / (pred.shape[-1] * count)).reshape(1).contiguous()
        return mse_backward(pred, vol, mask_f, ctx.p, ctx.eps, scale), None, None, None, None


@torch.compiler.disable
def fused(pred: torch.Tensor, vol: torch.Tensor, mask: torch.Tensor, p: int, eps: float = 1e-6) -> torch.Tensor:
    """Fused :func:`reference`: reads ``pred`` (N, L, p^3*C) and ``vol`` (N, C, D, H, W)
    once per masked token, computes the patch mean/variance on the fly, never builds the target.

    Returns an fp32 scalar. Gradient flows to ``pred`` only; ``vol`` must not require grad.
    """
    _check_mse_args(pred, vol, mask, p)
    if vol.requires_grad:
        raise ValueError("vol requires grad, but the fused loss treats the normalised target as a constant; "
                         "use mim_scale.ops.loss.reference to differentiate through the target")
    return MaskedNormPixMSE.apply(pred, vol, mask, p, eps)

