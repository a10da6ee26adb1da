"""Token gather (the encoder's visible tokens): torch reference, Triton kernels, autograd Function.

    reference(x, ids)   # torch.gather with an expanded index
    fused(x, ids)       # Triton: _gather_kernel, backward _gather_bwd_kernel (fp32 atomics)

x: (N, L, E), ids: (N, K) int -> (N, K, E): the tokens at ``ids``, in that order. Repeated ids accumulate
gradient, as in torch.gather. What the fusion removes: the expanded (N, K, E) index tensor.
"""

from __future__ import annotations

import torch

from ._triton import Kernels, cdiv, check_ids, next_pow2, tl, warps


def reference(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (N, L, E), ids: (N, K) int64 -> (N, K, E): the tokens at ``ids``, in that order."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _gather_kernel(x_ptr, ids_ptr, out_ptr, L, K, E, BLOCK_E: tl.constexpr):
    """out[n, k, :] = x[n, ids[n, k], :]; one program per (n, k) row and block of E."""
    r = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    inb = e < E
    n = r // K
    idx = tl.load(ids_ptr + r).to(tl.int64)
    vals = tl.load(x_ptr + (n * L + idx) * E + e, mask=inb)
    tl.store(out_ptr + r * E + e, vals, mask=inb)


def _gather_bwd_kernel(g_ptr, ids_ptr, out_ptr, L, K, E, BLOCK_E: tl.constexpr):
    """out[n, ids[n, k], :] += g[n, k, :] into an fp32 buffer (atomics: repeated ids accumulate, like
    torch.gather's backward; distinct ids touch each address once, so the result is deterministic)."""
    r = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    inb = e < E
    n = r // K
    idx = tl.load(ids_ptr + r).to(tl.int64)
    g = tl.load(g_ptr + r * E + e, mask=inb, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + (n * L + idx) * E + e, g, mask=inb)


KERNELS = Kernels(gather=_gather_kernel, gather_bwd=_gather_bwd_kernel)


def row_grid(rows: int, e: int) -> tuple[tuple[int, int], int]:
    """Grid (rows, blocks of E) and the block width for a one-program-per-row kernel."""
    block = min(next_pow2(max(e, 1)), 1024)
    return (rows, cdiv(e, block)), block


def launch_rows(kernel, rows: int, e: int, *args) -> None:
    """Run a one-program-per-row kernel (taking ``BLOCK_E``) over ``rows`` rows of width ``e``; nothing to do
    when either is 0."""
    if rows == 0 or e == 0:
        return
    grid, block = row_grid(rows, e)
    kernel[grid](*args, BLOCK_E=block, num_warps=warps(block))


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (N, L, E); ids: (N, K) int -> (N, K, E)."""
    n, length, e = x.shape
    k = ids.shape[1]
    out = torch.empty((n, k, e), device=x.device, dtype=x.dtype)
    launch_rows(KERNELS.for_tensor(x).gather, n * k, e, x, ids, out, length, k, e)
    return out


def gather_rows_backward(grad: torch.Tensor, ids: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """grad: (N, K, E) -> (N, length, E) in ``dtype``: the gradient of :func:`gather_rows` w.r.t. x."""
    n, k, e = grad.shape
    acc = torch.zeros((n, length, e), device=grad.device, dtype=torch.float32)
    launch_rows(KERNELS.for_tensor(grad).gather_bwd, n * k, e, grad, ids, acc, length, k, e)
    return acc.to(dtype)


class GatherTokens(torch.autograd.Function):
    """Autograd of the fused gather: the backward scatter-adds into an fp32 buffer."""

    @staticmethod
    def forward(ctx, x, ids):
        ids = ids.contiguous()
        ctx.save_for_backward(ids)
        ctx.length, ctx.dtype = x.shape[1], x.dtype
        return gather_rows(x.contiguous(), ids)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        return gather_rows_backward(grad.contiguous(), ids, ctx.length, ctx.dtype), None


@torch.compiler.disable
def fused(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (N, L, E), ids: (N, K) int -> (N, K, E). Repeated ids accumulate gradient, as in torch.gather."""
    if x.dim() != 3 or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens needs x (N, L, E) and ids (N, K), got {tuple(x.shape)} and {tuple(ids.shape)}")
    check_ids(ids, x.shape[1], "gather_tokens ids")
    return GatherTokens.apply(x, ids)
