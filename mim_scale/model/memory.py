"""Analytic memory of one training worker: parameters, gradients, optimizer state and saved activations.

An estimate to size hardware before a run (``mim-scale plan``) and beside measured peaks (the model bench),
not a measurement.
"""

from __future__ import annotations

import torch

from mim_scale.model.flops import level_plan

# bytes per parameter under mixed precision with an fp32 master: bf16 weight 2, bf16 grad 2, fp32 master 4,
# AdamW moments 8. ZeRO stage s partitions the last 12 (s >= 1), then the grads (s >= 2), then the weights (3).
PARAM_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12


def model_state_bytes_per_worker(params: float, zero_stage: int, workers: int) -> float:
    """Weights + gradients + optimizer state on one of ``workers`` ranks under ZeRO ``zero_stage``."""
    weights = PARAM_BYTES * params / (workers if zero_stage >= 3 else 1)
    grads = GRAD_BYTES * params / (workers if zero_stage >= 2 else 1)
    optimizer = OPTIMIZER_BYTES * params / (workers if zero_stage >= 1 else 1)
    return weights + grads + optimizer


def analytic_memory(cfg, precision: str = "bf16", batch: int = 1) -> dict[str, float]:
    """Estimated bytes: parameters + grads + AdamW state (fp32 master), and saved activations.

    Activations count what autograd keeps per layer (inputs of norms, linears, convs, GELU and
    the mask product; attention as its q, k, v and output) for ``batch`` crops; with activation
    checkpointing only each block's input is kept, plus one block's activations during recompute.
    An estimate to size hardware, not a measurement.
    """
    from mim_scale.model.mim import MiMModel

    with torch.device("meta"):
        n_params = sum(p.numel() for p in MiMModel(cfg).parameters())
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    m = cfg.model
    plan = level_plan(cfg)
    views = batch * sum(nv for _, nv, _ in plan)
    ckpt = m.activation_checkpointing
    total, largest_block = 0.0, 0.0
    for i, w in enumerate(m.widths[:-1]):
        pos = views * (m.view_size // 2 ** (i + 1)) ** 3
        hidden = int(w * m.mlp_ratio)
        per_block = pos * (7 * w + 2 * hidden) * act_bytes  # norm1, pw1, mask, dw, pw2, norm2, fc1 in/out, gelu
        largest_block = max(largest_block, per_block)
        total += pos * 3 * w * act_bytes  # patch embedding: conv out, norm, gelu
        total += m.conv_depths[i] * (pos * w * act_bytes if ckpt else per_block)
    e, d = m.embed_dim, m.decoder_dim
    for depth, dim, tokens in ((m.encoder_depth, e, sum(batch * nv * k for _, nv, k in plan)),
                               (m.decoder_depth, d, views * m.num_tokens)):
        per_block = tokens * (9 * dim + 2 * int(dim * m.mlp_ratio)) * act_bytes
        largest_block = max(largest_block, per_block)
        total += depth * (tokens * dim * act_bytes if ckpt else per_block)
    total += views * m.num_tokens * m.patch_size**3 * m.in_channels * 4 * 3  # pred, target, diff (fp32)
    if ckpt:
        total += largest_block
    return {"params": float(n_params), "param_grad_adam_bytes": 16.0 * n_params, "activation_bytes": total}


