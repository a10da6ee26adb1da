"""Building blocks of the hybrid backbone: conv blocks, transformer blocks, position embeddings.

Conv-stage tensors are kept channels-last, ``(N, D, H, W, C)``: the norms and the 1x1x1 convs
(``nn.Linear``) act on the last dimension without permutes, and only the depthwise conv sees a
permuted ``(N, C, D, H, W)`` view (a channels-last-3d stride pattern that oneDNN consumes directly).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mim_scale import ops


@functools.lru_cache(maxsize=32)
def _sincos_cpu(grid: int, dim: int) -> torch.Tensor:
    per_axis = (dim // 6) * 2  # even number of channels per axis; the rest stays zero
    out = torch.zeros(grid**3, dim, dtype=torch.float32)
    if per_axis == 0:
        return out
    half = per_axis // 2
    omega = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    coords = torch.stack(torch.meshgrid(*(torch.arange(grid, dtype=torch.float64),) * 3, indexing="ij"), dim=-1)
    coords = coords.reshape(-1, 3)  # raster order, depth slowest
    parts = []
    for axis in range(3):
        angle = coords[:, axis : axis + 1] * omega[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    emb = torch.cat(parts, dim=1).float()
    out[:, : emb.shape[1]] = emb
    return out


def sincos_pos_embed_3d(grid: int, dim: int, device: torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding: (grid^3, dim), tokens in raster order.

    Each axis gets ``2 * (dim // 6)`` channels (half sin, half cos, MAE frequencies); channels left
    over when ``dim`` is not a multiple of 6 are zero. Computed, not stored: it is not in any
    state dict, so checkpoints carry only learned weights.
    """
    return _sincos_cpu(grid, dim).to(device=device, dtype=dtype)


def _init_conv_(conv: nn.Conv3d) -> None:
    w = conv.weight
    fan_in = w.shape[1] * math.prod(w.shape[2:])
    fan_out = w.shape[0] * math.prod(w.shape[2:]) // max(conv.groups, 1)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(w, -bound, bound)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class Linear(nn.Linear):
    """``nn.Linear`` with MAE's init (xavier-uniform weight, zero bias), applied inside the
    constructor: under ZeRO-3's ``deepspeed.zero.Init`` a module's parameters are partitioned as
    soon as its constructor returns, so initialising from a parent afterwards would see empty shards."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` with a xavier-uniform init (fan over the kernel), zero bias, in the constructor."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _init_conv_(self)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on the last dimension."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        if dim <= 0 or hidden <= 0:
            raise ValueError(f"Mlp needs positive sizes, got dim={dim}, hidden={hidden}")
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Stride-2 patch embedding: conv (kernel 2, stride 2) -> LayerNorm -> GELU.

    x: (N, D, H, W, C_in) channels-last, or (N, C_in, D, H, W) when ``channels_first_input``
    -> (N, D/2, H/2, W/2, C_out) channels-last.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.proj = Conv3d(in_ch, out_ch, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(out_ch)

    def forward(self, x: torch.Tensor, channels_first_input: bool = False) -> torch.Tensor:
        if not channels_first_input:
            x = x.permute(0, 4, 1, 2, 3)
        y = self.proj(x).permute(0, 2, 3, 4, 1)
        return F.gelu(self.norm(y))


class _DepthwiseConv3dFn(torch.autograd.Function):
    """Depthwise 'same' conv3d with a CPU-friendly backward.

    PyTorch's CPU backward of a depthwise 3D conv is 10-40x its forward. Here the input gradient
    is a depthwise conv of the output gradient with the flipped kernel (a fast forward conv), and
    the weight gradient, per view, a grouped conv that uses the output gradient as its kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding: int):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, gout):
        x, weight = ctx.saved_tensors
        dt, p, c = gout.dtype, ctx.padding, x.shape[1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.conv3d(gout, weight.to(dt).flip(2, 3, 4), padding=p, groups=c).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # one view at a time: as a grouped conv with one input channel per group, oneDNN runs it
            # 10-20x faster than with all views stacked into each group (2 views of 48 x 48^3, bf16:
            # 37 ms against 414 ms); summed in fp32
            xp = F.pad(x.to(dt), (p,) * 6)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            gw = torch.zeros(weight.shape, dtype=acc, device=x.device)
            for i in range(x.shape[0]):
                inp = xp[i:i + 1].transpose(0, 1).reshape(1, c, *xp.shape[2:])
                gw += F.conv3d(inp, gout[i:i + 1].transpose(0, 1), groups=c).reshape(weight.shape).to(acc)
            gw = gw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gout.sum(dim=(0, 2, 3, 4)).to(weight.dtype)
        return gx, gw, gb, None


class DepthwiseConv3d(nn.Conv3d):
    """Depthwise conv with 'same' padding (odd kernel); on CPU, the fast backward above.

    Same parameters (and state-dict keys) as ``nn.Conv3d(dim, dim, k, padding=k // 2, groups=dim)``.
    """

    def __init__(self, dim: int, kernel: int):
        super().__init__(dim, dim, kernel_size=kernel, padding=kernel // 2, groups=dim)
        _init_conv_(self)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, *, fused: bool = False) -> torch.Tensor:
        """x: (N, C, D, H, W) -> same. With ``fused``: x (N, D, H, W, C) channels-last and ``keep``
        (N, D, H, W, 1) or None -> ``dw(x * keep)`` channels-last, by ``mim_scale.ops.masked_depthwise_conv3d``
        (called through this module so that ZeRO-3 gathers the weight first)."""
        if fused:
            return ops.masked_depthwise_conv3d(x, keep, self.weight, self.bias)
        if x.device.type != "cpu" or not torch.is_grad_enabled():
            return super().forward(x)
        if torch.is_autocast_enabled("cpu"):
            dt = torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                return _DepthwiseConv3dFn.apply(x.to(dt), self.weight.to(dt), self.bias.to(dt), self.padding[0])
        return _DepthwiseConv3dFn.apply(x, self.weight, self.bias, self.padding[0])


class _GatherRows(torch.autograd.Function):
    """rows = flat[idx] for unique idx, with an index_copy backward (no scatter-add)."""

    @staticmethod
    def forward(ctx, flat, idx):
        ctx.save_for_backward(idx)
        ctx.rows = flat.shape[0]
        return flat.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[1]).index_copy_(0, idx, grad), None


def gather_rows(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """flat: (R, C), idx: (K,) unique row indices -> (K, C)."""
    return _GatherRows.apply(flat, idx)


class ConvBlock(nn.Module):
    """ConvMAE conv block with masked depthwise conv, channels-last.

    x: (N, D, H, W, C); keep: (N, D, H, W, 1) with 1 at visible voxels (or None: dense, no mask).
    ``x + pw2(dw(keep * pw1(norm1(x))))``, then ``x + mlp(norm2(x))``. Multiplying by ``keep``
    right before the only spatial operation is what stops masked voxels from reaching visible ones.
    """

    def __init__(self, dim: int, kernel: int, mlp_ratio: float):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"depthwise kernel must be a positive odd number, got {kernel}")
        self.norm1 = nn.LayerNorm(dim)
        self.pw1 = Linear(dim, dim)
        self.dw = DepthwiseConv3d(dim, kernel)
        self.pw2 = Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        h = self.pw1(self.norm1(x))
        if ops.fused_enabled("masked_depthwise_conv3d", h, keep):
            # the fused Triton kernel, only where the dispatcher enables it (`auto`: a measured win; none yet)
            h = self.dw(h, keep, fused=True)
        else:
            if keep is not None:
                h = h * keep
            h = self.dw(h.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        x = x + self.pw2(h)
        return x + self.mlp(self.norm2(x))

    def forward_rows(self, rows: torch.Tensor, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The same block computed at visible voxels only.

        rows: (P_vis, C) the visible voxels of a (N, D, H, W, C) map, in the order of ``idx`` (their
        flat indices). Every operation but the depthwise conv is pointwise, so only the conv sees a
        dense map: visible rows scattered into zeros, which is exactly ``keep * pw1(norm1(x))``.
        Returns the block's output at the same rows, equal to :meth:`forward` there.
        """
        c = rows.shape[1]
        h = self.pw1(self.norm1(rows))
        dense = h.new_zeros(math.prod(shape[:-1]), c).index_copy(0, idx, h).view(*shape[:-1], c)
        d = gather_rows(self.dw(dense.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).reshape(-1, c), idx)
        rows = rows + self.pw2(d)
        return rows + self.mlp(self.norm2(rows))


class Attention(nn.Module):
    """Multi-head self-attention. x: (N, K, E); key_valid: (N, K) bool (True = real token) or None."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        n, k, e = x.shape
        qkv = self.qkv(x).reshape(n, k, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(n, k, e))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block. x: (N, K, E) -> (N, K, E)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_valid)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *extra, checkpointing: bool = False) -> torch.Tensor:
    """Apply ``blocks`` in order, each under activation checkpointing when asked and training."""
    use_ckpt = checkpointing and torch.is_grad_enabled()
    for block in blocks:
        if use_ckpt:
            x = checkpoint(block, x, *extra, use_reentrant=False)
        else:
            x = block(x, *extra)
    return x
