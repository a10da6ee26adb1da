"""Analytic FLOPs of one MiM training sample (one crop, every level), for MFU.

Counts multiply-adds of the matmuls and convolutions (x2 for FLOPs), including the attention
score and value products; norms, activations, masking and the loss are left out (they are
memory-bound, a few percent of the count). Training = 3 x forward (backward ~ 2 x forward), the
usual MFU convention: recomputation under activation checkpointing is *not* counted.
In the conv stages the depthwise convs, patch embeddings and fusion convs run densely on every
voxel of every view and the pointwise layers (1x1x1 convs, MLP) on visible voxels only (the
encoder's sparse conv path); the transformer stage sees the visible tokens only, the decoder
all L tokens of every view.
"""

from __future__ import annotations

from mim_scale.config import Config
from mim_scale.model.views import kept_count, octants_masked


def level_plan(cfg: Config) -> list[tuple[int, int, int]]:
    """[(level, views per crop, visible tokens per view)] for cfg's masking."""
    m, k = cfg.model, cfg.masking
    length = m.num_tokens
    if k.levels == 1:
        return [(1, 1, kept_count(length, k.level1_ratio))]
    octs = octants_masked(k.level1_ratio)
    plan = [(1, 1, length - octs * (length // 8)), (2, octs, kept_count(length, k.level2_ratio))]
    if k.levels >= 3:
        plan.append((3, octs * k.level3_picks, kept_count(length, k.level3_ratio)))
    return plan


def _block_macs(tokens: int, dim: int, hidden: int) -> float:
    """One pre-norm transformer block on ``tokens`` tokens (qkv, proj, MLP, QK^T, AV)."""
    return tokens * (4 * dim * dim + 2 * dim * hidden) + 2 * tokens * tokens * dim


def forward_flops(cfg: Config) -> dict[str, float]:
    """Forward FLOPs per crop, by part: conv_stages, fusion, encoder_transformer, decoder, align."""
    m = cfg.model
    v, n_stages, e, length = m.view_size, len(m.widths), m.embed_dim, m.num_tokens
    plan = level_plan(cfg)
    views = sum(nv for _, nv, _ in plan)
    chans = (m.in_channels,) + tuple(m.widths)

    def conv_macs(visible_fraction: float) -> float:
        macs = 0.0
        for i in range(n_stages - 1):
            w, c_in = m.widths[i], chans[i]
            pos = (v // 2 ** (i + 1)) ** 3
            hidden = int(w * m.mlp_ratio)
            macs += pos * 8 * c_in * w  # patch embedding (dense)
            # depthwise conv dense; the pointwise layers at visible voxels only (sparse conv path)
            macs += m.conv_depths[i] * pos * (m.conv_kernel**3 * w + visible_fraction * (2 * w * w + 2 * w * hidden))
        return macs + length * (8 * m.widths[-2] * e + e * e)  # token embedding + token_proj

    conv = sum(nv * conv_macs(k / length) for _, nv, k in plan)
    fusion = sum(length * (2 ** (n_stages - 1 - i)) ** 3 * m.widths[i] * e for i in range(n_stages - 1))

    enc_hidden = int(e * m.mlp_ratio)
    dec_hidden = int(m.decoder_dim * m.mlp_ratio)
    d = m.decoder_dim
    transformer = sum(nv * m.encoder_depth * _block_macs(k, e, enc_hidden) for _, nv, k in plan)
    decoder = sum(nv * (k * e * d) for _, nv, k in plan)
    decoder += views * (m.decoder_depth * _block_macs(length, d, dec_hidden) + length * d * m.patch_size**3 * m.in_channels)
    # alignment: projector on parent and child, predictor on the child, two layers each
    align = sum(nv * 3 * 2 * d * d for level, nv, _ in plan if level >= 2)
    macs = {"conv_stages": conv, "fusion": views * fusion, "encoder_transformer": transformer,
            "decoder": decoder, "align": align}
    return {key: 2.0 * val for key, val in macs.items()}


def flops_per_sample(cfg: Config) -> float:
    """Training FLOPs (forward + backward ~ 3 x forward) for one crop across all levels."""
    return 3.0 * sum(forward_flops(cfg).values())
