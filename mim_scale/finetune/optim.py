"""AdamW parameter groups with layer-wise lr decay, and the lr in absolute units, for fine-tuning.

Built on :mod:`mim_scale.model.optim` (which parameters decay, the warm-up + cosine shape), shared with
pre-training.

Layer-wise decay (BEiT/MAE fine-tuning): encoder parameters get ``lr * decay ** (L + 1 - layer)``,
where ``layer`` counts the encoder's units in registration order (a unit is each member of a
``ModuleList``/``Sequential`` of blocks, or a parameter-bearing module with no block list below it;
parameters held directly by a container come first, as layer 0) and ``L`` is the number of units.
Everything outside the encoder (new stage, decoder, head) is layer ``L + 1`` at the full rate. Weight decay
as in pre-training (:func:`mim_scale.model.optim.decays`): none on biases, norm weights and other 1-D
parameters.
"""

from __future__ import annotations

from torch import nn

from mim_scale.model.optim import decays, warmup_cosine


def encoder_units(encoder: nn.Module) -> list[str]:
    """Module names of the encoder's units, in registration order (roughly forward order)."""
    units: list[str] = []

    def has_list(m: nn.Module) -> bool:
        return any(isinstance(c, (nn.ModuleList, nn.Sequential)) for c in m.modules() if c is not m)

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if not any(True for _ in child.parameters()):
                continue
            if isinstance(child, (nn.ModuleList, nn.Sequential)):
                for sub_name, sub in child.named_children():
                    if any(True for _ in sub.parameters()):
                        units.append(f"{full}.{sub_name}")
            elif has_list(child):
                walk(child, full + ".")
            else:
                units.append(full)

    walk(encoder, "")
    return units


def encoder_layer_ids(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """(parameter name -> layer id in 0..L, L)."""
    units = encoder_units(encoder)
    ids: dict[str, int] = {}
    for name, _ in encoder.named_parameters():
        layer = 0
        for i, unit in enumerate(units, start=1):
            if name.startswith(unit + "."):
                layer = i
                break
        ids[name] = layer
    return ids, len(units)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 encoder_attr: str = "encoder") -> list[dict]:
    """AdamW groups with an ``lr_scale`` entry each; ``encoder_attr`` names the pre-trained sub-module."""
    encoder = getattr(model, encoder_attr, None)
    ids, num_layers = encoder_layer_ids(encoder) if encoder is not None else ({}, 0)
    groups: dict[tuple[int, bool], dict] = {}
    prefix = f"{encoder_attr}."
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = ids.get(name[len(prefix):], 0) if name.startswith(prefix) else num_layers + 1
        no_decay = not decays(name, p)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [], "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers + 1 - layer),
                "layer": layer,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` (step 0 gets base_lr / warmup), then half-cosine to min_lr."""
    return warmup_cosine(step, warmup_steps, total_steps, low=min_lr, high=base_lr)
