"""Masked depthwise 3-D conv of a ConvMAE conv block: torch reference, Triton kernels, autograd Function.

    reference(x, keep, weight, bias)   # x * keep, permuted to (N, C, D, H, W), F.conv3d(groups=C), permuted back
    fused(x, keep, weight, bias)       # Triton: _dw_conv_kernel (forward and input gradient),
                                       #         _dw_wgrad_kernel (weight gradient, deterministic partial sums)

The contract is :class:`mim_scale.model.layers.ConvBlock`'s ``dw(h * keep)`` on channels-last activations:

- x: (N, D, H, W, C), channels-last (the output of the block's ``pw1``), fp32 or bf16;
- keep: (N, D, H, W, 1) or (N, D, H, W), 1 at visible voxels, 0 at masked ones, or None (dense, no mask);
- weight: (C, 1, k, k, k), k odd ('same' padding k // 2, zeros outside the volume); bias: (C,) or None;
- returns (N, D, H, W, C) in x's dtype: ``bias[c] + sum_tap weight[c, tap] * (x * keep)[voxel + tap - k//2]``.

Gradients: w.r.t. x (``keep * conv(grad, flipped weight)``: the same kernel, mask applied to its output),
weight (per tap and channel, summed over every voxel: fp32 partial sums per voxel chunk, reduced by torch in a
fixed order, so the result is deterministic) and bias. ``keep`` is a mask and gets no gradient: ``fused``
refuses a ``keep`` that requires grad (the dispatcher sends it to the reference). Every product and sum is fp32;
results are stored in x's (output, input gradient) or the parameter's (weight, bias gradient) dtype.

What the fusion removes against the model's eager path: the ``h * keep`` tensor (written, read back, and saved
for backward), the permuted views' layout dance, and in backward the masked input it would otherwise recompute.
Whether it beats cuDNN's channels-last depthwise conv is a GPU measurement (``python benchmarks/ops_kernels.py``);
until one says so, ``auto`` keeps it off (:mod:`mim_scale.ops.auto`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import Kernels, cdiv, next_pow2, tl

# Voxels x channels per program. Channels are contiguous (channels-last), so a row of BLOCK_C channels is one
# coalesced read; 128 x 32 fp32 accumulators are 32 registers per thread at 4 warps. Not tuned on a GPU yet.
BLOCK_S = 128
MAX_BLOCK_C = 32
# Voxel blocks summed by one weight-gradient program before it writes its partial sums.
WGRAD_BLOCKS = 16


def reference(x: torch.Tensor, keep: torch.Tensor | None, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """Plain torch: (N, D, H, W, C) -> (N, D, H, W, C), computed in x's dtype (see the module docstring)."""
    _check_args(x, keep, weight, bias)
    h = x if keep is None else x * keep.reshape(*x.shape[:4], 1).to(x.dtype)
    k = weight.shape[-1]
    y = F.conv3d(h.permute(0, 4, 1, 2, 3), weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                 padding=k // 2, groups=x.shape[-1])
    return y.permute(0, 2, 3, 4, 1)


def _check_args(x: torch.Tensor, keep: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 5:
        raise ValueError(f"masked_depthwise_conv3d needs x (N, D, H, W, C) channels-last, got {tuple(x.shape)}")
    c = x.shape[-1]
    if weight.dim() != 5 or weight.shape[0] != c or weight.shape[1] != 1 or len(set(weight.shape[2:])) != 1:
        raise ValueError(f"weight must be (C, 1, k, k, k) = ({c}, 1, k, k, k), got {tuple(weight.shape)}")
    if weight.shape[-1] % 2 == 0:
        raise ValueError(f"depthwise kernel must be odd for 'same' padding, got {weight.shape[-1]}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"bias must be (C,) = ({c},), got {tuple(bias.shape)}")
    if keep is not None and tuple(keep.shape) not in (tuple(x.shape[:4]), tuple(x.shape[:4]) + (1,)):
        raise ValueError(f"keep must be (N, D, H, W[, 1]) = {tuple(x.shape[:4])}, got {tuple(keep.shape)}")


def _dw_conv_kernel(x_ptr, keep_ptr, w_ptr, b_ptr, out_ptr, NS, D, H, W, C,
                    K: tl.constexpr, HAS_KEEP: tl.constexpr, KEEP_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    FLIP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[s, c] = bias[c] + sum_tap w[c, tap] * x[s + tap - K//2, c] * keep[s + tap - K//2], channels-last.

    Program (i, j) computes voxels [i*BLOCK_S, (i+1)*BLOCK_S) of the flattened (N, D, H, W) grid, channels
    [j*BLOCK_C, (j+1)*BLOCK_C). With KEEP_OUT the mask multiplies the output instead of the input, and FLIP reads
    the kernel mirrored: together, the input gradient keep * conv(grad, flipped w). Zero padding outside.
    """
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_in = s < NS
    c_in = c < C
    wx = s % W
    hy = (s // W) % H
    dz = (s // (W * H)) % D
    nb = s // (W * H * D)
    acc = tl.full([BLOCK_S, BLOCK_C], 0.0, tl.float32)
    for kd in range(K):
        zz = dz + (kd - K // 2)
        ok_d = s_in & (zz >= 0) & (zz < D)
        for kh in range(K):
            yy = hy + (kh - K // 2)
            ok_h = ok_d & (yy >= 0) & (yy < H)
            for kw in range(K):
                xx = wx + (kw - K // 2)
                ok = ok_h & (xx >= 0) & (xx < W)
                src = ((nb * D + zz) * H + yy) * W + xx
                v = tl.load(x_ptr + src[:, None] * C + c[None, :], mask=ok[:, None] & c_in[None, :],
                            other=0.0).to(tl.float32)
                if HAS_KEEP:
                    if not KEEP_OUT:
                        kv = tl.load(keep_ptr + src, mask=ok, other=0.0).to(tl.float32)
                        v = v * kv[:, None]
                if FLIP:
                    tap = (K * K * K - 1) - ((kd * K + kh) * K + kw)
                else:
                    tap = (kd * K + kh) * K + kw
                wv = tl.load(w_ptr + c * (K * K * K) + tap, mask=c_in, other=0.0).to(tl.float32)
                acc += v * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_in, other=0.0).to(tl.float32)[None, :]
    if HAS_KEEP:
        if KEEP_OUT:
            acc = acc * tl.load(keep_ptr + s, mask=s_in, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + s[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=s_in[:, None] & c_in[None, :])


def _dw_wgrad_kernel(x_ptr, keep_ptr, g_ptr, part_ptr, NS, D, H, W, C, NBLK,
                     K: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[i, tap, c] = sum over voxels s of chunk i of (x * keep)[s + tap - K//2, c] * g[s, c] (fp32).

    Program (i, j): voxel chunk i (NBLK blocks of BLOCK_S voxels), channels [j*BLOCK_C, (j+1)*BLOCK_C); for each
    tap it sums over the chunk, so the grad tile and its shifted input tiles are re-read from cache, not memory.
    """
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    for kd in range(K):
        for kh in range(K):
            for kw in range(K):
                acc = tl.full([BLOCK_S, BLOCK_C], 0.0, tl.float32)
                for b in range(NBLK):
                    s = (i * NBLK + b) * BLOCK_S + tl.arange(0, BLOCK_S)
                    s_in = s < NS
                    wx = s % W
                    hy = (s // W) % H
                    dz = (s // (W * H)) % D
                    nb = s // (W * H * D)
                    zz = dz + (kd - K // 2)
                    yy = hy + (kh - K // 2)
                    xx = wx + (kw - K // 2)
                    ok = s_in & (zz >= 0) & (zz < D) & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                    src = ((nb * D + zz) * H + yy) * W + xx
                    v = tl.load(x_ptr + src[:, None] * C + c[None, :], mask=ok[:, None] & c_in[None, :],
                                other=0.0).to(tl.float32)
                    if HAS_KEEP:
                        v = v * tl.load(keep_ptr + src, mask=ok, other=0.0).to(tl.float32)[:, None]
                    gv = tl.load(g_ptr + s[:, None] * C + c[None, :], mask=s_in[:, None] & c_in[None, :],
                                 other=0.0).to(tl.float32)
                    acc += v * gv
                tap = (kd * K + kh) * K + kw
                tl.store(part_ptr + (i * (K * K * K) + tap) * C + c, tl.reduce(acc, 0, tl.standard._sum_combine),
                         mask=c_in)


KERNELS = Kernels(conv=_dw_conv_kernel, wgrad=_dw_wgrad_kernel)


def _block_c(c: int) -> int:
    return min(next_pow2(c), MAX_BLOCK_C)


def conv_launch(x: torch.Tensor, keep: torch.Tensor | None, w: torch.Tensor, bias: torch.Tensor | None, k: int,
                keep_out: bool = False, flip: bool = False) -> torch.Tensor:
    """x: (N, D, H, W, C) contiguous; keep: (N, D, H, W) contiguous or None; w: (C, k^3) contiguous;
    bias: (C,) or None -> (N, D, H, W, C) in x's dtype."""
    n, d, h, wd, c = x.shape
    out = torch.empty_like(x)
    ns = n * d * h * wd
    if out.numel() == 0:
        return out
    bc = _block_c(c)
    grid = (cdiv(ns, BLOCK_S), cdiv(c, bc))
    KERNELS.for_tensor(x).conv[grid](x, keep if keep is not None else x, w, bias if bias is not None else w, out,
                                     ns, d, h, wd, c, K=k, HAS_KEEP=keep is not None, KEEP_OUT=keep_out,
                                     HAS_BIAS=bias is not None, FLIP=flip, BLOCK_S=BLOCK_S, BLOCK_C=bc, num_warps=4)
    return out


def wgrad_launch(x: torch.Tensor, keep: torch.Tensor | None, grad: torch.Tensor, k: int) -> torch.Tensor:
    """x, grad: (N, D, H, W, C) contiguous; keep: (N, D, H, W) or None -> (C, k^3) fp32 weight gradient."""
    n, d, h, wd, c = x.shape
    ns = n * d * h * wd
    if ns == 0:
        return torch.zeros((c, k**3), device=x.device, dtype=torch.float32)
    nblk = min(WGRAD_BLOCKS, cdiv(ns, BLOCK_S))
    nchunks = cdiv(ns, BLOCK_S * nblk)
    part = torch.empty((nchunks, k**3, c), device=x.device, dtype=torch.float32)
    bc = _block_c(c)
    KERNELS.for_tensor(x).wgrad[(nchunks, cdiv(c, bc))](x, keep if keep is not None else x, grad, part, ns, d, h,
                                                        wd, c, nblk, K=k, HAS_KEEP=keep is not None,
                                                        BLOCK_S=BLOCK_S, BLOCK_C=bc, num_warps=4)
    return part.sum(0).t()


class MaskedDepthwiseConv3d(torch.autograd.Function):
    """Autograd of the fused conv: gradients for x, weight and bias (keep is a constant mask)."""

    @staticmethod
    def forward(ctx, x, keep, weight, bias):
        k = weight.shape[-1]
        x = x.contiguous()
        keep_c = None if keep is None else keep.reshape(x.shape[:4]).contiguous()
        w = weight.reshape(weight.shape[0], k**3).contiguous()
        ctx.save_for_backward(x, keep_c, w)
        ctx.k, ctx.weight_shape, ctx.weight_dtype = k, weight.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return conv_launch(x, keep_c, w, None if bias is None else bias.contiguous(), k)

    @staticmethod
    def backward(ctx, grad):
        x, keep_c, w = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = conv_launch(grad, keep_c, w, None, ctx.k, keep_out=True, flip=True).to(x.dtype)
        if ctx.needs_input_grad[2]:
            gw = wgrad_launch(x, keep_c, grad, ctx.k).reshape(ctx.weight_shape).to(ctx.weight_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            gb = grad.float().sum(dim=(0, 1, 2, 3)).to(ctx.bias_dtype)
        return gx, None, gw, gb


@torch.compiler.disable
def fused(x: torch.Tensor, keep: torch.Tensor | None, weight: torch.Tensor,
          bias: torch.Tensor | None) -> torch.Tensor:
    """Fused :func:`reference` (same contract); fp32 arithmetic, output in x's dtype. ``keep`` gets no gradient."""
    _check_args(x, keep, weight, bias)
    if keep is not None and keep.requires_grad:
        raise ValueError("keep requires grad, but the fused masked depthwise conv treats the mask as a constant; "
                         "use mim_scale.ops.depthwise.reference to differentiate through it")
    devices = {t.device for t in (x, weight, bias, keep) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, keep, weight and bias must share a device, got {sorted(map(str, devices))}")
    return MaskedDepthwiseConv3d.apply(x, keep, weight, bias)
