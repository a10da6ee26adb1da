"""A plain single-device AdamW loop over random crops of whole CT volumes (no DeepSpeed, no loader processes).

Used where one process and a few hundred steps are enough: the fine-tuning protocol's pre-training arm
(:mod:`mim_scale.finetune.protocol`), the learning tests, and the MiM-vs-MAE comparison
(``benchmarks/mim_vs_mae.py``). The distributed trainer is :mod:`mim_scale.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from mim_scale.config import Config
from mim_scale.model.mim import MiMModel
from mim_scale.model.optim import param_groups
from mim_scale.model.validation import random_crops


def crop_stream(volumes_hu: list[np.ndarray], cfg: Config, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless stream of (batch, 1, S, S, S) random crops from the volumes, in turn."""
    rng = np.random.default_rng(seed)
    i = 0
    while True:
        yield torch.cat([random_crops(volumes_hu[(i + j) % len(volumes_hu)], cfg.data.crop_size, 1, rng,
                                      cfg.data.hu_min, cfg.data.hu_max) for j in range(batch)])
        i += batch


def train(model: MiMModel, crops: Iterator[torch.Tensor], steps: int, *, lr: float, weight_decay: float = 0.05,
          betas: tuple[float, float] = (0.9, 0.95), warmup: int = 10, grad_clip: float = 1.0, seed: int = 0,
          on_step: Callable[[int, dict], None] | None = None) -> list[dict[str, float]]:
    """A plain single-device AdamW loop (linear warm-up, constant after); returns per-step losses."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for step in range(steps):
        out = model(next(crops), generator=gen, progress=step / max(1, steps - 1))
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        record = {k: float(v.detach()) for k, v in out.items()}
        if not math.isfinite(record["total"]):
            raise FloatingPointError(f"step {step}: total loss is {record['total']}")
        history.append(record)
        if on_step is not None:
            on_step(step, record)
    return history
