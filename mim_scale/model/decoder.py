"""The MAE decoder: visible latents + mask tokens -> decoder features and per-patch predictions."""

from __future__ import annotations

import torch
from torch import nn

from mim_scale.model.layers import Linear, TransformerBlock, run_blocks, sincos_pos_embed_3d
from mim_scale.model.ops import scatter_tokens


class MaskedDecoder(nn.Module):
    """Linear embed -> scatter with a learned mask token -> + sin-cos pos -> blocks -> norm -> head.

    latent: (N, K, E) visible encoder tokens; ids_keep: (N, K); key_valid: (N, K) bool or None
    -> features (N, L, D) after the final norm (used by alignment), pred (N, L, p^3 * C).
    """

    def __init__(self, embed_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, qkv_bias: bool,
                 grid: int, patch_size: int, in_channels: int, activation_checkpointing: bool = False):
        super().__init__()
        if min(embed_dim, dim, depth, heads, grid, patch_size, in_channels) < 1:
            raise ValueError("decoder sizes must all be >= 1")
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.dim = dim
        self.grid = grid
        self.num_tokens = grid**3
        self.activation_checkpointing = activation_checkpointing
        self.embed = Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = Linear(dim, patch_size**3 * in_channels)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor,
                key_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(latent)
        length = self.num_tokens
        if key_valid is not None:
            # padding entries land on an extra slot that is dropped afterwards
            ids_keep = torch.where(key_valid, ids_keep, torch.full_like(ids_keep, length))
            full = scatter_tokens(h, ids_keep, self.mask_token.reshape(-1), length + 1)[:, :length]
        else:
            full = scatter_tokens(h, ids_keep, self.mask_token.reshape(-1), length)
        full = full + sincos_pos_embed_3d(self.grid, self.dim, full.device, full.dtype)
        full = run_blocks(self.blocks, full, checkpointing=self.activation_checkpointing)
        feats = self.norm(full)
        return feats, self.head(feats)
