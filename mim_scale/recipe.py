"""The optimisation recipe a run actually trains with, resolved for one worker count.

A config states the recipe in the units an operator thinks in (crops per optimizer step, epochs); what a
worker needs is per-worker numbers (micro-steps per step, optimizer steps). This module owns that
translation, for the driver (``mim-scale plan``, ``pretrain``'s summary, the elastic check) and for every
worker (``run_training`` resolves it again for the world size it joined), so the two cannot disagree.

Rules (docs/MIM_METHOD.md, 'Reference pre-training recipe'):

- **Global batch** in crops: ``train.global_batch_crops``, kept exactly at any worker count by gradient
  accumulation: ``grad_accum = global_batch_crops / (workers x micro_batch)``, which must be whole. With
  ``global_batch_crops = 0`` the batch is ``launch.workers x micro_batch x grad_accum`` (accumulation 1
  when unset), and an elastic group of another size keeps that batch the same way.
- **Peak lr**: ``train.lr`` if set, else ``base_lr x global_batch_crops / 256`` (linear scaling).
- **Epoch**: as many volume reads as the training set has volumes (the stream samples volumes with
  replacement by mixture weight, so an epoch is a count, not a pass). One volume read feeds
  ``data.crops_per_volume`` crops, so a step reads ``global_batch_crops / crops_per_volume`` volumes.
- **Schedule**: ``train.steps`` if set, else ``ceil(epochs x volumes / volumes_per_step)``; warm-up
  ``train.warmup_steps``, or ``round(warmup_epochs x steps_per_epoch)`` when ``warmup_epochs`` is set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mim_scale.config import Config, ConfigError

LR_REFERENCE_BATCH = 256  # the linear-scaling rule's denominator (MAE, and the published MiM script)


@dataclass(frozen=True)
class Recipe:
    """Batch, lr and schedule for ``workers`` workers; every count in the unit its name says."""

    workers: int
    micro_batch_crops: int  # crops per worker per micro-step
    grad_accum: int  # micro-steps per optimizer step
    crops_per_step: int  # the global batch
    crops_per_volume: int
    volumes_per_step: float
    peak_lr: float
    lr_rule: str  # how peak_lr was obtained
    warmup_steps: int | None  # None only in a plan made without the training set's volume count
    total_steps: int | None
    training_volumes: int | None  # volumes in the training manifest (None: not known here)
    steps_per_epoch: float | None
    epochs: float | None  # total_steps in epochs (None when training_volumes is unknown)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def global_batch_crops(cfg: Config) -> int:
    """Crops per optimizer step that every worker count must keep."""
    t = cfg.train
    if t.global_batch_crops:
        return t.global_batch_crops
    return cfg.launch.workers * t.micro_batch * max(1, t.grad_accum)


def grad_accum_for(cfg: Config, workers: int) -> int:
    """Micro-steps per optimizer step on ``workers`` workers; a ConfigError naming the key if the global batch
    cannot be kept there."""
    t = cfg.train
    batch = global_batch_crops(cfg)
    per_micro_step = workers * t.micro_batch
    if batch % per_micro_step:
        key = "train.global_batch_crops" if t.global_batch_crops else "train.grad_accum"
        raise ConfigError(key, f"the global batch of {batch} crops does not split over {workers} workers x "
                               f"train.micro_batch {t.micro_batch}; worker counts that keep it: "
                               f"{_list(allowed_worker_counts(cfg, 1, max(workers, 64)))}")
    accum = batch // per_micro_step
    if t.global_batch_crops and t.grad_accum and workers == cfg.launch.workers and accum != t.grad_accum:
        raise ConfigError("train.grad_accum", f"{t.grad_accum} contradicts train.global_batch_crops "
                                              f"{t.global_batch_crops} on {workers} workers x micro_batch "
                                              f"{t.micro_batch} (it needs {accum}); set one of them, or 0 to derive")
    return accum


def allowed_worker_counts(cfg: Config, lo: int, hi: int) -> list[int]:
    """Worker counts in [lo, hi] that keep the global batch exactly."""
    batch, micro = global_batch_crops(cfg), cfg.train.micro_batch
    return [w for w in range(lo, hi + 1) if batch % (w * micro) == 0]


def peak_lr(cfg: Config) -> tuple[float, str]:
    t = cfg.train
    if t.lr > 0:
        return t.lr, "train.lr"
    batch = global_batch_crops(cfg)
    return t.base_lr * batch / LR_REFERENCE_BATCH, f"train.base_lr {t.base_lr:g} x {batch} crops / {LR_REFERENCE_BATCH}"


def resolve(cfg: Config, workers: int | None = None, training_volumes: int | None = None, *,
            need_steps: bool = True) -> Recipe:
    """The recipe on ``workers`` (default ``launch.workers``) for a training set of ``training_volumes``.

    Raises ConfigError when the batch does not split, or when the steps derive from epochs and the volume
    count is unknown (unless ``need_steps`` is False: then the steps are None, for a plan).
    """
    t, d = cfg.train, cfg.data
    workers = workers or cfg.launch.workers
    accum = grad_accum_for(cfg, workers)
    batch = global_batch_crops(cfg)
    volumes_per_step = batch / d.crops_per_volume
    steps_per_epoch = training_volumes / volumes_per_step if training_volumes else None
    if t.steps:
        total = t.steps
    elif steps_per_epoch is None and not need_steps:
        total = None
    elif steps_per_epoch is None:
        raise ConfigError("train.steps", f"0 derives the steps from train.epochs = {t.epochs:g} and the training "
                                         "set's volume count, which is unknown: set data.shards to a manifest "
                                         "(or train.steps)")
    else:
        total = max(1, math.ceil(t.epochs * steps_per_epoch))
    if t.warmup_epochs and steps_per_epoch is not None:
        warmup = min(total, round(t.warmup_epochs * steps_per_epoch))
    elif t.warmup_epochs and not need_steps:
        warmup = None
    elif t.warmup_epochs:
        raise ConfigError("train.warmup_epochs", "needs the training set's volume count: set data.shards")
    else:
        warmup = t.warmup_steps
    lr, rule = peak_lr(cfg)
    return Recipe(workers=workers, micro_batch_crops=t.micro_batch, grad_accum=accum, crops_per_step=batch,
                  crops_per_volume=d.crops_per_volume, volumes_per_step=volumes_per_step, peak_lr=lr, lr_rule=rule,
                  warmup_steps=warmup, total_steps=total, training_volumes=training_volumes,
                  steps_per_epoch=steps_per_epoch,
                  epochs=total / steps_per_epoch if steps_per_epoch and total else None)


def apply(cfg: Config, recipe: Recipe) -> Config:
    """``cfg`` with the recipe's per-worker numbers written in (what the engine reads). Idempotent: resolving
    the result again, on any worker count that keeps the batch, gives the same batch, lr and schedule."""
    return cfg.replace({"train.global_batch_crops": recipe.crops_per_step, "train.grad_accum": recipe.grad_accum,
                        "train.steps": recipe.total_steps, "train.warmup_steps": recipe.warmup_steps,
                        "train.warmup_epochs": 0.0, "train.lr": recipe.peak_lr})


def training_volume_count(cfg: Config) -> int | None:
    """Volumes in the training manifest (``data.shards``), or None when no manifest is configured."""
    if not cfg.data.shards:
        return None
    from mim_scale.data.stream import manifest_shards

    return sum(s.samples for s in manifest_shards(cfg.data))


def _list(counts: list[int]) -> str:
    return ", ".join(map(str, counts)) if counts else "none up to 64"
