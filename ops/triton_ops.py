"""Triton paths of the masking and patching operations, with autograd.

Every public function here has the signature and the semantics of its namesake in
:mod:`mim_scale.ops.reference`; the dispatcher (``mim_scale.ops``) chooses between the two. Called with CUDA
tensors they run compiled kernels; with CPU tensors they run the same kernels under Triton's interpreter
(slow, exact: how the parity tests run them on CPU).

Differences a caller can see, all documented on the function: ``masked_norm_pix_mse`` gives no gradient
to ``vol`` (the target is a constant; the dispatcher sends a ``vol`` that requires grad to the reference),
and ``make_views`` gives no gradient at all (crops are data).
"""

from __future__ import annotations

import torch

from . import _triton_kernels as K
from .reference import _check_view_args


def _check_ids(ids: torch.Tensor, upper: int, what: str) -> None:
    """Index range check without a host sync on CUDA (device-side assert)."""
    if ids.numel() == 0:
        return
    ok = ((ids >= 0) & (ids < upper)).all()
    if ids.is_cuda:
        torch._assert_async(ok, f"{what} out of range [0, {upper})")
    elif not bool(ok):
        raise ValueError(f"{what} must lie in [0, {upper}); got values in [{int(ids.min())}, {int(ids.max())}]")


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


class _MaskedNormPixMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, vol, mask, p, eps):
        pred = pred.contiguous()
        vol = vol.contiguous()
        mask_f = mask.to(torch.float32).contiguous()
        per_token = K.mse_forward(pred, vol, mask_f, p, eps)
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
        return K.mse_backward(pred, vol, mask_f, ctx.p, ctx.eps, scale), None, None, None, None


@torch.compiler.disable
def masked_norm_pix_mse(pred: torch.Tensor, vol: torch.Tensor, mask: torch.Tensor, p: int,
                        eps: float = 1e-6) -> torch.Tensor:
    """Fused :func:`reference.masked_norm_pix_mse`: reads ``pred`` (N, L, p^3*C) and ``vol`` (N, C, D, H, W)
    once per masked token, computes the patch mean/variance on the fly, never builds the target.

    Returns an fp32 scalar. Gradient flows to ``pred`` only; ``vol`` must not require grad.
    """
    _check_mse_args(pred, vol, mask, p)
    if vol.requires_grad:
        raise ValueError("vol requires grad, but the fused loss treats the normalised target as a constant; "
                         "use mim_scale.ops.reference.masked_norm_pix_mse to differentiate through the target")
    return _MaskedNormPixMSE.apply(pred, vol, mask, p, eps)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids):
        ids = ids.contiguous()
        ctx.save_for_backward(ids)
        ctx.length, ctx.dtype = x.shape[1], x.dtype
        return K.gather_rows(x.contiguous(), ids)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        return K.gather_rows_backward(grad.contiguous(), ids, ctx.length, ctx.dtype), None


@torch.compiler.disable
def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (N, L, E), ids: (N, K) int -> (N, K, E). Repeated ids accumulate gradient, as in torch.gather."""
    if x.dim() != 3 or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens needs x (N, L, E) and ids (N, K), got {tuple(x.shape)} and {tuple(ids.shape)}")
    _check_ids(ids, x.shape[1], "gather_tokens ids")
    return _GatherTokens.apply(x, ids)


class _ScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visible, ids_keep, fill, length):
        ids_keep = ids_keep.contiguous()
        inv = K.inverse_index(ids_keep, length)
        ctx.save_for_backward(ids_keep, inv)
        ctx.fill_dtype = fill.dtype
        return K.scatter_rows(visible.contiguous(), inv, fill.to(visible.dtype).contiguous())

    @staticmethod
    def backward(ctx, grad):
        ids_keep, inv = ctx.saved_tensors
        grad = grad.contiguous()
        grad_visible = K.gather_rows(grad, ids_keep) if ctx.needs_input_grad[0] else None
        grad_fill = K.fill_grad(grad, inv).to(ctx.fill_dtype) if ctx.needs_input_grad[2] else None
        return grad_visible, None, grad_fill, None


@torch.compiler.disable
def scatter_tokens(visible: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, length: int) -> torch.Tensor:
    """visible: (N, K, E); ids_keep: (N, K) -> (N, length, E), ``fill`` (E,) elsewhere.

    As with torch.scatter, when an id repeats within a row which of its rows lands is unspecified (the
    decoder's padding rows all point at one extra position that it slices off); gradients match torch's.
    """
    if visible.dim() != 3 or tuple(ids_keep.shape) != tuple(visible.shape[:2]):
        raise ValueError(f"scatter_tokens needs visible (N, K, E) and ids_keep (N, K), "
                         f"got {tuple(visible.shape)} and {tuple(ids_keep.shape)}")
    if tuple(fill.shape) != (visible.shape[2],):
        raise ValueError(f"fill must be (E,) = ({visible.shape[2]},), got {tuple(fill.shape)}")
    _check_ids(ids_keep, length, "scatter_tokens ids_keep")
    return _ScatterTokens.apply(visible, ids_keep, fill, length)


@torch.compiler.disable
def make_views(crop: torch.Tensor, octants: torch.Tensor, picks: torch.Tensor, p: int,
               masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused :func:`reference.make_views`: one kernel writes all three levels' views (and applies the token
    masks) reading the crop once for level 1, once per level-2 octant and per level-3 patch.

    The three results are consecutive slices of one buffer (each contiguous). No gradient.
    """
    _check_view_args(crop, octants, picks, p)
    if crop.requires_grad:
        raise ValueError("make_views' fused kernel gives no gradient; crop requires grad (use the reference)")
    n, _, d, _, _ = crop.shape
    s = d // 2
    k2, k3 = octants.shape[1], picks.shape[2]
    _check_ids(octants, 8, "make_views octants")
    _check_ids(picks, (s // p) ** 3, "make_views picks")
    mask_all = None
    if masks is not None:
        counts = (n, n * k2, n * k2 * k3)
        length = (s // p) ** 3
        for level, (m, rows) in enumerate(zip(masks, counts), start=1):
            if tuple(m.shape) != (rows, length):
                raise ValueError(f"make_views level-{level} mask must be ({rows}, {length}), got {tuple(m.shape)}")
        mask_all = torch.cat([m.to(device=crop.device, dtype=torch.float32) for m in masks]).contiguous()
    out = K.views(crop.contiguous(), octants.reshape(-1).long().contiguous(), picks.reshape(-1).long().contiguous(),
                  p, mask_all)
    return out[:n], out[n:n + n * k2], out[n + n * k2:]
