"""The optimisation rules every trainer shares: which parameters get weight decay, and the lr schedule.

Pre-training (:mod:`mim_scale.engine.deepspeed_engine`) takes :func:`param_groups` and
:func:`warmup_cosine` as they are; fine-tuning (:mod:`mim_scale.finetune.optim`) builds its layer-wise-decay
groups on :func:`decays` and its lr on :func:`warmup_cosine`.
"""

from __future__ import annotations

import math

from torch import nn

_NO_DECAY_NAMES = ("pos_embed", "mask_token")


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether AdamW weight decay applies: weight matrices and conv kernels only; not biases and norm weights
    (every parameter with fewer than 2 dimensions), position embeddings or the mask token. A parameter built
    under ZeRO-3's ``deepspeed.zero.Init`` is an empty shard: its dimensions are those of ``ds_shape``."""
    ndim = len(param.ds_shape) if hasattr(param, "ds_shape") else param.ndim
    return ndim >= 2 and not any(key in name for key in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: not decayed, weight_decay: 0}] (see :func:`decays`).

    Frozen parameters are left out. Empty groups are dropped.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, low: float = 0.0, high: float = 1.0) -> float:
    """The lr at optimizer step ``step`` (0-based): linear warm-up to ``high`` over ``warmup_steps`` (step 0 gets
    high / warmup_steps), then a half-cosine from ``high`` down to ``low`` at ``total_steps``, held there after.

    In units of your choice: pre-training asks for a multiplier of the peak (high 1, low min_lr / peak),
    fine-tuning for the lr itself (high lr, low min_lr)."""
    if warmup_steps > 0 and step < warmup_steps:
        return high * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
