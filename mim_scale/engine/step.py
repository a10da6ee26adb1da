"""One optimizer step on one rank: ``grad_accum`` micro-steps of the MiM model in its DeepSpeed engine.

:func:`train_step` pulls the micro-batches, moves them to the device (int16 HU -> the HU window there), runs the
forward, backward and engine step of each, and returns a :class:`StepResult` (this rank's counts, with units in
their names); :func:`reduce_step` adds the step to the run's :class:`~mim_scale.engine.checkpoint.TrainState`,
with one all-reduce for the counts of every rank.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mim_scale.config import Config
from mim_scale.data.window import hu_window
from mim_scale.engine.checkpoint import TrainState
from mim_scale.engine.collectives import sum_over_ranks


def mask_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the masks drawn at (step, micro-step, rank): resume reproduces them with no saved RNG."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class CorruptCounter:
    """Samples the loader skipped as undecodable, from the running count each loader worker stamps on its
    crops' ``meta`` (``worker``, ``corrupt``): new ones go to Prometheus, and are counted since the last
    checkpoint (what the checkpoint adds to the run's total) and since this process started."""

    def __init__(self, metrics=None):
        self.metrics = metrics
        self._seen_per_worker: dict[int, int] = {}
        self.since_checkpoint = 0
        self.since_start = 0

    def observe(self, meta: dict[str, Any]) -> None:
        new = meta["corrupt"] - self._seen_per_worker.get(meta["worker"], 0)
        if new > 0:
            self.since_checkpoint += new
            self.since_start += new
            if self.metrics is not None:
                self.metrics.record_corrupt_skipped(new, meta["shard"])
        self._seen_per_worker[meta["worker"]] = meta["corrupt"]

    def take_since_checkpoint(self) -> int:
        n, self.since_checkpoint = self.since_checkpoint, 0
        return n


@dataclass
class StepResult:
    """What one optimizer step did on this rank (counts are this rank's; :func:`reduce_step` sums them)."""

    losses: dict[str, float]  # scalar model outputs, mean over the micro-steps
    crops: int  # crops trained on: micro_batch x grad_accum
    volume_reads: int  # volume reads those crops came from (a crop with crop_index 0 starts one)
    views: int  # masked views (all levels) through the model
    tokens: int  # visible tokens through the encoder's transformer
    step_seconds: float  # wall time, data wait included
    data_wait_seconds: float
    data_digest: str  # which crops, in which order: equal digests = the same data (resume tests)
    last_crops: torch.Tensor = field(repr=False)  # float32 (micro_batch, 1, S, S, S), for the pictures


def train_step(engine, batches: Iterator[dict], cfg: Config, state: TrainState, rank: int, device: torch.device,
               corrupt: CorruptCounter) -> StepResult:
    """Run one optimizer step (``cfg.train.grad_accum`` micro-batches of ``cfg.train.micro_batch`` crops)."""
    t0 = time.perf_counter()
    data_wait = 0.0
    sums: dict[str, float] = {}
    volume_reads = tokens = views = crops_seen = 0
    digest = hashlib.sha256()
    for micro in range(cfg.train.grad_accum):
        t_wait = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t_wait
        for m in batch["meta"]:
            volume_reads += m["crop_index"] == 0
            corrupt.observe(m)
            digest.update(f"{m['shard']}/{m['key']}/{m['pick']}/{m['crop_index']};".encode())
        # int16 HU crosses to the device (half the bytes), the HU window runs there: float32 crops, since
        # the views and reconstruction targets are cut from them; the model casts only the encoder's input
        # to the engine's dtype (bf16 steps of ~8 HU would blur level-3 targets)
        crops = hu_window(batch["crop"].to(device=device, non_blocking=True), cfg.data.hu_min, cfg.data.hu_max)
        generator = torch.Generator(device=device).manual_seed(mask_seed(cfg.train.seed, state.step, micro, rank))
        out = engine(crops, generator=generator, progress=state.step / cfg.train.steps)
        engine.backward(out["total"])
        engine.step()
        state.batches_consumed_per_rank += 1
        for key, value in out.items():
            if torch.is_tensor(value) and value.numel() == 1:
                sums[key] = sums.get(key, 0.0) + float(value.detach().float())
        # the model reports tokens and views per crop; a micro-batch holds micro_batch crops
        tokens += round(float(out["tokens"]) * crops.shape[0]) if "tokens" in out else 0
        views += round(float(out["views"]) * crops.shape[0]) if "views" in out else 0
        crops_seen += crops.shape[0]
    return StepResult(losses={k: v / cfg.train.grad_accum for k, v in sums.items()}, crops=crops_seen,
                      volume_reads=volume_reads, views=views, tokens=tokens,
                      step_seconds=time.perf_counter() - t0, data_wait_seconds=data_wait,
                      data_digest=digest.hexdigest()[:16], last_crops=crops)


def reduce_step(step: StepResult, state: TrainState, world: int, device: torch.device) -> dict[str, float]:
    """Count the step into ``state`` (crops, volume reads, views, tokens summed over ranks) and return the losses
    with the collapse monitors (``z_std_*``, ``zraw_std_*``) averaged over ranks: one all-reduce per step."""
    losses = dict(step.losses)
    monitors = sorted(k for k in losses if k.startswith(("z_std", "zraw_std")))
    totals = sum_over_ranks([step.tokens, step.views, step.volume_reads] + [losses[k] for k in monitors], device)
    losses.update({k: totals[3 + i] / world for i, k in enumerate(monitors)})
    state.step += 1
    state.samples_seen += step.crops * world  # crops; every rank trains the same number per step
    state.tokens_seen += round(totals[0])
    state.views_seen += round(totals[1])
    state.volumes_seen += round(totals[2])
    return losses
