"""Token scatter with the mask token (the decoder's input): torch reference, Triton kernels, autograd Function.

    reference(visible, ids_keep, fill, length)   # expand + clone + scatter
    fused(visible, ids_keep, fill, length)       # Triton: _scatter_kernel; backward = gather + _fill_grad_kernel

visible: (N, K, E); ids_keep: (N, K) -> (N, length, E), ``fill`` (E,) at every other position. What the fusion
removes: the filled copy that scatter overwrites (one pass: each output row is a visible row or the mask
token); the fill's gradient is a deterministic sum of per-block partial sums.
"""

from __future__ import annotations

import torch

from ._triton import Kernels, cdiv, check_ids, next_pow2, tl, warps
from .gather import gather_rows, launch_rows


def reference(visible: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, length: int) -> torch.Tensor:
    """Place visible tokens back on the full grid, ``fill`` (E,) at every other position.

    visible: (N, K, E); ids_keep: (N, K) -> (N, length, E).
    """
    n, _, e = visible.shape
    out = fill.to(visible.dtype).expand(n, length, e).clone()
    return out.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, e), visible)


def _scatter_kernel(vis_ptr, inv_ptr, fill_ptr, out_ptr, L, K, E, BLOCK_E: tl.constexpr):
    """out[n, l, :] = visible[n, inv[n, l], :] where inv >= 0, else fill; one program per output row."""
    r = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    inb = e < E
    n = r // L
    j = tl.load(inv_ptr + r).to(tl.int64)
    # scalar conditions folded into the bound, so each load is masked by one vector comparison
    hit = (j >= 0).to(tl.int32)
    vals = tl.load(vis_ptr + (n * K + j) * E + e, mask=e < E * hit, other=0.0)
    fill = tl.load(fill_ptr + e, mask=e < E * (1 - hit), other=0.0)
    tl.store(out_ptr + r * E + e, tl.where(e < E * hit, vals, fill), mask=inb)


def _fill_grad_kernel(g_ptr, inv_ptr, part_ptr, NL, E, ROWS: tl.constexpr, BLOCK_E: tl.constexpr):
    """part[b, :] = sum of g rows in row block b that hold the fill (inv < 0); fp32 partial sums, reduced
    by the caller, so the fill's gradient is deterministic."""
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    inb = e < E
    acc = tl.full([BLOCK_E], 0.0, tl.float32)
    for i in range(ROWS):
        r = b * ROWS + i
        in_rows = r < NL
        j = tl.load(inv_ptr + r, mask=in_rows, other=0)
        is_fill = (in_rows & (j < 0)).to(tl.int32)
        acc += tl.load(g_ptr + r * E + e, mask=e < E * is_fill, other=0.0).to(tl.float32)
    tl.store(part_ptr + b * E + e, acc, mask=inb)


KERNELS = Kernels(scatter=_scatter_kernel, fill_grad=_fill_grad_kernel)


def inverse_index(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """ids_keep: (N, K) -> inv: (N, length) int32, inv[n, ids_keep[n, k]] = k and -1 elsewhere."""
    n, k = ids_keep.shape
    inv = torch.full((n, length), -1, device=ids_keep.device, dtype=torch.int32)
    src = torch.arange(k, device=ids_keep.device, dtype=torch.int32).expand(n, k)
    return inv.scatter_(1, ids_keep.long(), src)


def scatter_rows(visible: torch.Tensor, inv: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """visible: (N, K, E); inv: (N, L) int32; fill: (E,) in visible's dtype -> (N, L, E)."""
    n, k, e = visible.shape
    length = inv.shape[1]
    out = torch.empty((n, length, e), device=visible.device, dtype=visible.dtype)
    launch_rows(KERNELS.for_tensor(visible).scatter, n * length, e, visible, inv, fill, out, length, k, e)
    return out


def fill_grad(grad: torch.Tensor, inv: torch.Tensor, rows_per_program: int = 64) -> torch.Tensor:
    """grad: (N, L, E); inv: (N, L) -> (E,) fp32: the sum of grad over rows that hold the fill."""
    n, length, e = grad.shape
    rows = n * length
    if rows == 0 or e == 0:
        return torch.zeros((e,), device=grad.device, dtype=torch.float32)
    nblocks = cdiv(rows, rows_per_program)
    part = torch.empty((nblocks, e), device=grad.device, dtype=torch.float32)
    block = min(next_pow2(e), 1024)
    KERNELS.for_tensor(grad).fill_grad[(nblocks, cdiv(e, block))](grad, inv, part, rows, e, ROWS=rows_per_program,
                                                                  BLOCK_E=block, num_warps=warps(block))
    return part.sum(0)


class ScatterTokens(torch.autograd.Function):
    """Autograd of the fused scatter: visible rows' gradient is a gather, the fill's a partial-sum reduction."""

    @staticmethod
    def forward(ctx, visible, ids_keep, fill, length):
        ids_keep = ids_keep.contiguous()
        inv = inverse_index(ids_keep, length)
        ctx.save_for_backward(ids_keep, inv)
        ctx.fill_dtype = fill.dtype
        return scatter_rows(visible.contiguous(), inv, fill.to(visible.dtype).contiguous())

    @staticmethod
    def backward(ctx, grad):
        ids_keep, inv = ctx.saved_tensors
        grad = grad.contiguous()
        grad_visible = gather_rows(grad, ids_keep) if ctx.needs_input_grad[0] else None
        grad_fill = fill_grad(grad, inv).to(ctx.fill_dtype) if ctx.needs_input_grad[2] else None
        return grad_visible, None, grad_fill, None


@torch.compiler.disable
def fused(visible: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, length: int) -> torch.Tensor:
    """visible: (N, K, E); ids_keep: (N, K) -> (N, length, E), ``fill`` (E,) elsewhere.

    As with torch.scatter, when an id repeats within a row which of its rows lands is unspecified (the
    decoder's padding rows all point at one extra position that it slices off); gradients match torch's.
    """
    if visible.dim() != 3 or tuple(ids_keep.shape) != tuple(visible.shape[:2]):
        raise ValueError(f"scatter_tokens needs visible (N, K, E) and ids_keep (N, K), "
                         f"got {tuple(visible.shape)} and {tuple(ids_keep.shape)}")
    if tuple(fill.shape) != (visible.shape[2],):
        raise ValueError(f"fill must be (E,) = ({visible.shape[2]},), got {tuple(fill.shape)}")
    check_ids(ids_keep, length, "scatter_tokens ids_keep")
    return ScatterTokens.apply(visible, ids_keep, fill, length)
