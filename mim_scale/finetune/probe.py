"""Linear probe: frozen encoder features -> a per-voxel linear classifier -> Dice on the test volumes.

A cheaper second number per encoder than fine-tuning: the encoder is frozen (eval mode, no gradients);
every stage's feature map is upsampled (trilinear) to the input grid and concatenated, standardised per
channel by a non-affine BatchNorm (as MAE's linear probe does; it is a fixed affine map at inference, so
the classifier stays linear) and mapped to class logits by one 1x1x1 convolution. Only that convolution
trains, with the fine-tuning recipe's crops, loss and seed, so probes of different encoders are comparable.
Dice is computed exactly as for fine-tuning (:func:`mim_scale.finetune.validation.segmentation_metrics`).

Python::

    linear_probe("dataset.json", "export/", recipe, steps=200, lr=1e-2)   # or init="scratch", model_config=...
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mim_scale.config import ModelConfig
from mim_scale.errors import UserFacingError
from mim_scale.finetune.build import resolve_init, roi_for
from mim_scale.finetune.data import TrainSampler, class_names, deterministic_transforms, load_cached, read_dataset
from mim_scale.finetune.recipe import Recipe
from mim_scale.finetune.train import _loss, _val_cache, resolve_device
from mim_scale.finetune.validation import segmentation_metrics


class LinearProbe(nn.Module):
    """x (N, C, D, H, W) -> logits (N, num_classes, D, H, W) from the frozen encoder's stage features."""

    def __init__(self, encoder: nn.Module, widths: tuple[int, ...], num_classes: int):
        super().__init__()
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        channels = int(sum(widths))
        self.norm = nn.BatchNorm3d(channels, affine=False)
        self.head = nn.Conv3d(channels, num_classes, kernel_size=1)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: its norms and dropout stay in inference mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder.forward_features(x)
            up = torch.cat([F.interpolate(f.float(), size=x.shape[2:], mode="trilinear", align_corners=False)
                            for f in feats], dim=1)
        return self.head(self.norm(up))


def linear_probe(data: str | Path, init: str, recipe: Recipe, *, steps: int, lr: float,
                 model_config: ModelConfig | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a linear probe on ``data``'s training volumes; Dice on its validation volumes.

    ``recipe`` gives the preprocessing, crops, batch, loss and seed (``train.seed``); ``steps`` and ``lr``
    are the probe's own (AdamW, constant lr). Returns {"validation": metrics, "steps", "seconds", "init"}.
    """
    if recipe.task != "segmentation":
        raise UserFacingError("the linear probe is for segmentation recipes")
    t0 = time.perf_counter()
    torch.manual_seed(recipe.train.seed)
    enc = resolve_init(init, model_config)
    spec = read_dataset(data, recipe.task)
    names = class_names(recipe, spec)
    roi = roi_for(recipe, enc.model)
    device = resolve_device(recipe.train.device)
    torch.manual_seed(recipe.train.seed + 1)
    probe = LinearProbe(enc.encoder, tuple(enc.model.widths), len(names)).to(device)
    train_cache = load_cached(spec.training, deterministic_transforms(recipe, roi, with_label=True), spec.source)
    val_cache = _val_cache(recipe, spec, roi)
    sampler = TrainSampler(train_cache, recipe, roi)
    loss_fn = _loss(recipe)
    opt = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    probe.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = sampler.batch(step)
        loss = loss_fn(probe(batch["image"].to(device)), batch["label"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    metrics = segmentation_metrics(probe, val_cache, roi, recipe, names)
    seconds = time.perf_counter() - t0
    log(f"probe {Path(init).name if init != 'scratch' else 'scratch'}: {steps} steps, final loss "
        f"{float(loss):.4f}, mean Dice {metrics['mean_dice']}, {seconds:.1f} s")
    return {"init": enc.source, "steps": steps, "lr": lr, "final_loss": float(loss), "seconds": seconds,
            "validation": metrics}


__all__ = ["LinearProbe", "linear_probe"]
