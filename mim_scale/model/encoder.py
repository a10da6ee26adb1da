"""The hybrid ConvMAE-style 3D encoder (MIM_METHOD.md, 'Hybrid backbone').

Its ``state_dict()`` is what the export stage ships: the foundation checkpoint's **version 1 key
schema**. With ``n = len(widths)`` stages (``n - 1`` conv stages, then the transformer stage),
``E = widths[-1]``, ``p = 2 ** n``::

    stages.{i}.embed.proj.{weight,bias}        Conv3d(widths[i-1] or in_channels -> widths[i], k=2, s=2)
    stages.{i}.embed.norm.{weight,bias}        LayerNorm(widths[i])
    stages.{i}.blocks.{j}.norm1.{weight,bias}  LayerNorm
    stages.{i}.blocks.{j}.pw1.{weight,bias}    Linear (the first 1x1x1 conv), weight (C, C)
    stages.{i}.blocks.{j}.dw.{weight,bias}     Conv3d depthwise, weight (C, 1, k, k, k)
    stages.{i}.blocks.{j}.pw2.{weight,bias}    Linear (the second 1x1x1 conv)
    stages.{i}.blocks.{j}.norm2.{weight,bias}  LayerNorm
    stages.{i}.blocks.{j}.mlp.fc1/fc2.{weight,bias}   pointwise MLP (ratio mlp_ratio)
    token_embed.proj.{weight,bias}             Conv3d(widths[-2] -> E, k=2, s=2)
    token_embed.norm.{weight,bias}             LayerNorm(E)
    token_proj.{weight,bias}                   Linear(E, E)
    blocks.{j}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2 .{weight,bias}
    fusion.{i}.{weight,bias}                   Conv3d(widths[i] -> E, kernel = stride = 2 ** (n - 1 - i))
    norm.{weight,bias}                         LayerNorm(E), after transformer + fusion

``i`` runs over the conv stages ``0 .. n-2``, ``j`` over blocks. Position embeddings are fixed 3D
sin-cos, recomputed on the fly (:func:`sincos_pos_embed_3d`), so they are not in the state dict.
Linear weights are ``(out, in)``; a 1x1x1 conv weight ``(out, in, 1, 1, 1)`` is the same numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mim_scale.config import ModelConfig
from mim_scale.model.layers import (ConvBlock, PatchEmbed, TransformerBlock, gather_rows, run_blocks,
                                    Conv3d, Linear, sincos_pos_embed_3d)
from mim_scale.model.ops import gather_tokens, upsample_token_mask

KEY_SCHEMA_VERSION = 1


def center_input(x: torch.Tensor) -> torch.Tensor:
    """Windowed intensities in [0, 1] -> [-1, 1] before the stem (like MAE's input normalisation).

    Why: the stem is conv (k2, s2) -> LayerNorm over channels. On a [0, 1] input the conv output
    at a voxel is ``c * sum(w) + w . delta`` (c the local level, delta the local structure), and
    the LayerNorm divides out its size, so wherever c dominates (soft tissue sits at ~0.52 in the
    default window, structure at ~0.01-0.05) the features are the same for every level and almost
    blind to structure -- the very thing the per-patch normalised target asks for. Centred, soft
    tissue (HU ~ 0 under the default window) is near 0 and its structure reaches the features.
    """
    return x * 2.0 - 1.0


class ConvStage(nn.Module):
    """Patch embedding then conv blocks. x: channels-last (or channels-first for the first stage)."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, kernel: int, mlp_ratio: float):
        super().__init__()
        self.embed = PatchEmbed(in_ch, out_ch)
        self.blocks = nn.ModuleList(ConvBlock(out_ch, kernel, mlp_ratio) for _ in range(depth))


class HybridEncoder(nn.Module):
    """Conv stages with masked depthwise convs, a transformer stage on visible tokens, fusion.

    Built from a :class:`ModelConfig` alone: ``HybridEncoder(cfg.model)``.

    - :meth:`forward_features` (fine-tuning): x (N, C, V, V, V) -> dense feature map of every stage.
    - :meth:`forward_masked` (pre-training): x plus visible token ids -> (N, K, E) visible tokens.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"HybridEncoder needs a ModelConfig, got {type(cfg).__name__}")
        widths = tuple(cfg.widths)
        if len(widths) < 2 or len(cfg.conv_depths) != len(widths) - 1:
            raise ValueError(f"need >= 2 widths and len(widths) - 1 conv depths, got {widths}, {cfg.conv_depths}")
        if cfg.view_size % cfg.patch_size:
            raise ValueError(f"view_size {cfg.view_size} is not divisible by patch size {cfg.patch_size}")
        self.cfg = cfg
        self.in_channels = cfg.in_channels
        self.view_size = cfg.view_size
        self.patch_size = cfg.patch_size
        self.grid = cfg.grid
        self.embed_dim = cfg.embed_dim
        self.widths = widths
        self.activation_checkpointing = cfg.activation_checkpointing
        self.conv_chunk = 2  # views per checkpointed conv chunk (only used under activation checkpointing)
        # masked conv blocks computed at visible voxels only (False: dense with the mask product, as
        # ConvMAE writes it; same results at visible tokens, kept for benchmarks and tests)
        self.sparse_conv = True
        n = len(widths)
        chans = (cfg.in_channels,) + widths
        self.stages = nn.ModuleList(
            ConvStage(chans[i], widths[i], cfg.conv_depths[i], cfg.conv_kernel, cfg.mlp_ratio) for i in range(n - 1))
        self.token_embed = PatchEmbed(widths[-2], widths[-1])
        self.token_proj = Linear(widths[-1], widths[-1])
        self.blocks = nn.ModuleList(
            TransformerBlock(widths[-1], cfg.encoder_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.encoder_depth))
        self.fusion = nn.ModuleList(
            Conv3d(widths[i], widths[-1], kernel_size=2 ** (n - 1 - i), stride=2 ** (n - 1 - i)) for i in range(n - 1))
        self.norm = nn.LayerNorm(widths[-1])

    # -- pieces -------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        v = self.view_size
        if x.dim() != 5 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (v, v, v):
            raise ValueError(f"encoder input must be (N, {self.in_channels}, {v}, {v}, {v}), got {tuple(x.shape)}")

    def conv_features(self, x: torch.Tensor, keep: torch.Tensor | None,
                      checkpoint_blocks: bool | None = None) -> list[torch.Tensor]:
        """Conv stages. x: (N, C, V, V, V); keep: (N, L) with 1 at visible tokens, or None (dense).

        Returns the output of every conv stage, channels-last: (N, V/2^(i+1), ..., widths[i]).
        ``checkpoint_blocks`` (default: the config's activation_checkpointing) checkpoints each block.
        """
        ckpt = self.activation_checkpointing if checkpoint_blocks is None else checkpoint_blocks
        feats = []
        h = center_input(x)
        for i, stage in enumerate(self.stages):
            h = stage.embed(h, channels_first_input=(i == 0))
            if keep is None:
                h = run_blocks(stage.blocks, h, None, checkpointing=ckpt)
            elif self.sparse_conv:
                h = self._stage_rows(stage, h, keep, ckpt)
            else:
                keep_vox = upsample_token_mask(keep, self.grid, h.shape[1]).to(h.dtype).permute(0, 2, 3, 4, 1)
                h = run_blocks(stage.blocks, h, keep_vox, checkpointing=ckpt)
            feats.append(h)
        return feats

    def _stage_rows(self, stage: ConvStage, h: torch.Tensor, keep: torch.Tensor, ckpt: bool) -> torch.Tensor:
        """A conv stage's blocks at visible voxels only; the output map is zero at masked voxels.

        Exactly the dense masked computation at visible voxels (every block op but the depthwise
        conv is pointwise, and the conv input is zero at masked voxels either way); what is skipped
        is work at masked voxels, which no visible token ever reads.
        """
        if len(stage.blocks) == 0:
            return h
        shape = tuple(h.shape)
        vox = upsample_token_mask(keep, self.grid, shape[1]).permute(0, 2, 3, 4, 1).reshape(-1)
        idx = vox.nonzero().squeeze(1)
        rows = gather_rows(h.reshape(-1, shape[-1]), idx)
        use_ckpt = ckpt and torch.is_grad_enabled()
        for block in stage.blocks:
            if use_ckpt:
                rows = checkpoint(block.forward_rows, rows, idx, shape, use_reentrant=False)
            else:
                rows = block.forward_rows(rows, idx, shape)
        return rows.new_zeros(math.prod(shape[:-1]), shape[-1]).index_copy(0, idx, rows).view(shape)

    def token_inputs(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense token embeddings and fusion terms on the full grid: both (N, L, E)."""
        t = self.token_embed(feats[-1])  # (N, g, g, g, E)
        n = t.shape[0]
        t = self.token_proj(t.reshape(n, -1, self.embed_dim))
        t = t + sincos_pos_embed_3d(self.grid, self.embed_dim, t.device, t.dtype)
        fused = 0
        for f, proj in zip(feats, self.fusion):
            fused = fused + proj(f.permute(0, 4, 1, 2, 3)).flatten(2).transpose(1, 2)
        return t, fused

    def masked_token_inputs(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv stages + token embedding + fusion terms for masked views -> (tokens, fused), (N, L, E) each.

        Under activation checkpointing the whole conv part runs in chunks of ``conv_chunk`` views,
        each one checkpoint that keeps only its (N, L, E) outputs: the dense full-resolution stage
        activations, the bulk of the memory, then exist for ``conv_chunk`` views at a time only.
        """
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return self.token_inputs(self.conv_features(x, keep))
        tokens, fused = [], []
        for s in range(0, x.shape[0], self.conv_chunk):
            t, f = checkpoint(self._chunk_token_inputs, x[s:s + self.conv_chunk], keep[s:s + self.conv_chunk],
                              use_reentrant=False)
            tokens.append(t)
            fused.append(f)
        return torch.cat(tokens), torch.cat(fused)

    def _chunk_token_inputs(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_inputs(self.conv_features(x, keep, checkpoint_blocks=False))

    def transformer(self, tokens: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (N, K, E) -> (N, K, E) through the transformer blocks (no final norm)."""
        return run_blocks(self.blocks, tokens, key_valid, checkpointing=self.activation_checkpointing)

    # -- entry points ---------------------------------------------------------------------------

    def forward_masked(self, x: torch.Tensor, ids_keep: torch.Tensor,
                       key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Encode visible tokens only.

        x: (N, C, V, V, V); ids_keep: (N, K) int64 visible token ids (raster order over the grid);
        key_valid: (N, K) bool, False marks padding entries of ``ids_keep`` (or None) -> (N, K, E).
        """
        self._check_input(x)
        keep = token_keep_mask(ids_keep, key_valid, self.grid**3)
        tokens, fused = self.masked_token_inputs(x, keep)
        return self.encode_visible(tokens, fused, ids_keep, key_valid)

    def encode_visible(self, tokens: torch.Tensor, fused: torch.Tensor, ids_keep: torch.Tensor,
                       key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Gather visible tokens, run the transformer, add the gathered fusion, norm -> (N, K, E)."""
        h = self.transformer(gather_tokens(tokens, ids_keep), key_valid)
        return self.norm(h + gather_tokens(fused, ids_keep))

    def forward_features(self, x: torch.Tensor, fuse: bool = False) -> list[torch.Tensor]:
        """Dense (unmasked) features of every stage, for fine-tuning.

        x: (N, C, V', V', V') with V' divisible by the patch size (any size; the sin-cos position
        embedding follows the grid) -> [stage 1 (N, widths[0], V'/2, ...), ..., stage n-1,
        last stage (N, E, V'/p, V'/p, V'/p)]. The last stage is ``norm(transformer(tokens))``;
        with ``fuse=True`` the fusion convs' terms are added before the norm, as in pre-training.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"encoder input must be (N, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        d, h, w = x.shape[2:]
        p = self.patch_size
        if d % p or h % p or w % p:
            raise ValueError(f"input size {(d, h, w)} is not divisible by the patch size {p}")
        feats = self.conv_features(x, None)
        t = self.token_embed(feats[-1])
        n, gd, gh, gw, e = t.shape
        t = self.token_proj(t.reshape(n, -1, e))
        t = t + _pos_embed_box(gd, gh, gw, e, t.device, t.dtype)
        t = self.transformer(t)
        if fuse:
            for f, proj in zip(feats, self.fusion):
                t = t + proj(f.permute(0, 4, 1, 2, 3)).flatten(2).transpose(1, 2)
        t = self.norm(t)
        out = [f.permute(0, 4, 1, 2, 3).contiguous() for f in feats]
        out.append(t.transpose(1, 2).reshape(n, e, gd, gh, gw))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Same as :meth:`forward_features` (dense features, no masking)."""
        return self.forward_features(x)


def _pos_embed_box(gd: int, gh: int, gw: int, dim: int, device, dtype) -> torch.Tensor:
    """Sin-cos embedding for a (gd, gh, gw) grid, the cube's embedding cropped to the box."""
    g = max(gd, gh, gw)
    pe = sincos_pos_embed_3d(g, dim, device, dtype).reshape(g, g, g, dim)
    return pe[:gd, :gh, :gw].reshape(-1, dim)


def token_keep_mask(ids_keep: torch.Tensor, key_valid: torch.Tensor | None, length: int) -> torch.Tensor:
    """ids_keep: (N, K) (+ key_valid (N, K) bool) -> keep: (N, L) float, 1 at visible tokens."""
    keep = torch.zeros(ids_keep.shape[0], length + 1, device=ids_keep.device)
    idx = ids_keep if key_valid is None else torch.where(key_valid, ids_keep, torch.full_like(ids_keep, length))
    keep.scatter_(1, idx, 1.0)
    return keep[:, :length]


def build_encoder(model_cfg: ModelConfig) -> HybridEncoder:
    """The encoder alone, e.g. for fine-tuning: ``build_encoder(cfg.model)``."""
    return HybridEncoder(model_cfg)
