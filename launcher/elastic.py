"""Elastic sizing: which worker counts a Ray Train group may run with, and the accumulation that keeps the
recipe's global batch on each (:mod:`mim_scale.recipe` owns the arithmetic)."""

from __future__ import annotations

from mim_scale.config import Config
from mim_scale.errors import UserFacingError
from mim_scale.recipe import allowed_worker_counts, global_batch_crops, grad_accum_for


def elastic_grad_accum(cfg: Config, world: int) -> int:
    """Accumulation steps that keep the global batch on ``world`` workers (:func:`mim_scale.recipe.grad_accum_for`):
    an elastic group of any size in [min_workers, workers] trains the same schedule."""
    return grad_accum_for(cfg, world)


def check_elastic(cfg: Config) -> None:
    """Every worker count Ray may choose in [min_workers, workers] must keep the global batch whole; the error
    names the counts that would."""
    lo, hi = worker_range(cfg)
    allowed = allowed_worker_counts(cfg, lo, hi)
    bad = [w for w in range(lo, hi + 1) if w not in allowed]
    if bad:
        batch = global_batch_crops(cfg)
        anywhere = allowed_worker_counts(cfg, 1, max(hi, 64))
        raise UserFacingError(f"launch.min_workers={lo}..launch.workers={hi}: with {bad} workers the global batch of "
                              f"{batch} crops (train.global_batch_crops, or workers x micro_batch x grad_accum) does "
                              f"not split into whole micro-batches of {cfg.train.micro_batch}; worker counts that keep "
                              f"it: {', '.join(map(str, anywhere))}")


def worker_range(cfg: Config) -> tuple[int, int]:
    """(min, max) training workers; equal when the group is not elastic."""
    lo = cfg.launch.min_workers or cfg.launch.workers
    return lo, cfg.launch.workers
