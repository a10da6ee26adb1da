"""Optimizer parameter groups: weight decay on weight matrices and conv kernels only."""

from __future__ import annotations

from torch import nn

_NO_DECAY_NAMES = ("pos_embed", "mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: not decayed, weight_decay: 0}].

    No decay on biases and norm weights (every parameter with fewer than 2 dimensions), position
    embeddings and the mask token; frozen parameters are left out. Empty groups are dropped.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(key in name for key in _NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
