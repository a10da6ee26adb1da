"""The per-worker training loop: stream -> MiM model in a DeepSpeed engine -> metrics and checkpoints.

It runs inside each Ray Train worker (see ``mim_scale.launcher``), or under ``torchrun``/``deepspeed``
with the process group already described by RANK/WORLD_SIZE/MASTER_ADDR. What differs between those is
only the :class:`~mim_scale.engine.reporter.Reporter` (how checkpoints and metrics leave the worker).

The pieces, one concern each: :mod:`.startup` (process group, recipe, engine, the state to continue from),
:mod:`.step` (one optimizer step -> a :class:`~mim_scale.engine.step.StepResult`), :mod:`.save_agreement` (the
save/stop decision all ranks agree on), :mod:`.record` (metrics, history, TensorBoard, pictures),
:mod:`.validate`, :mod:`.checkpoint` (+ :mod:`.full_state`), :mod:`.drills` (failure drills).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mim_scale.config import Config
from mim_scale.engine import checkpoint as ckpt
from mim_scale.engine.collectives import sum_over_ranks
from mim_scale.engine.drills import inject_fault, parse_fault
from mim_scale.engine.record import StepRecorder
from mim_scale.engine.reporter import Reporter
from mim_scale.engine.save_agreement import SaveAgreement
from mim_scale.engine.startup import build, join_process_group, resolve_recipe, start_state
from mim_scale.engine.step import CorruptCounter, reduce_step, train_step

log = logging.getLogger("mim_scale.train")


def run_training(cfg: Config, *, run_dir: Path, reporter: Reporter, init_weights: Path | None = None,
                 on_step: Callable[[dict], None] | None = None, fault: str | None = None) -> dict[str, Any]:
    """Train for ``cfg.train.steps`` optimizer steps, resuming from the reporter's latest checkpoint.

    Returns the last step's metrics record. Every rank must call this. ``fault``: see
    :func:`~mim_scale.engine.drills.parse_fault`.
    """
    from mim_scale.data.stream import make_loader, manifest_shards

    fault_drill, t_start = parse_fault(fault), time.perf_counter()
    rank, world, device = join_process_group(cfg)
    cfg, recipe = resolve_recipe(cfg, world, reporter.files, rank)
    engine, scheduler = build(cfg, world, init_weights)
    state = start_state(engine, scheduler, cfg, reporter, rank, world)
    recorder = StepRecorder(cfg, run_dir, reporter.files, rank, state, recipe, device, t_start)
    batches = iter(make_loader(cfg.data, manifest_shards(cfg.data), rank=rank, world_size=world,
                               batch_size=cfg.train.micro_batch, batches_consumed=state.batches_consumed_per_rank,
                               seed=state.stream_seed))
    validation_set = _validation_set(cfg, run_dir, rank)
    agreement, corrupt = SaveAgreement(cfg, reporter.stop_requested), CorruptCounter(recorder.metrics)
    record: dict[str, Any] = {"step": state.step}
    while state.step < cfg.train.steps:
        inject_fault(fault_drill, rank, state.step + 1, state.restarts, run_dir)
        step = train_step(engine, batches, cfg, state, rank, device, corrupt)
        losses = reduce_step(step, state, world, device)
        decision = agreement.decide(state.step, losses, device)
        record = recorder.step_record(step, losses, state, engine, scheduler, corrupt.since_start)
        if validation_set is not None and (state.step % cfg.train.validate_every == 0 or state.step == cfg.train.steps):
            from mim_scale.engine.validate import evaluate

            record.update(evaluate(engine.module, validation_set))  # every rank: ZeRO-3 forwards are collective
            record["validation_set"] = validation_set.source  # "held-out" or "seen"
            recorder.validation(record, state.step, validation_set.source)
        recorder.record(record, step, losses, decision.save)
        if on_step is not None:
            on_step(record)
        if decision.nonfinite:
            raise FloatingPointError(f"non-finite loss at step {state.step} on some rank: {losses}")
        recorder.pictures(engine.module, step.last_crops, state.step, decision.save)
        if decision.save:
            _save(engine, scheduler, state, losses, corrupt, reporter, recorder, record, rank, device)
            agreement.saved()
            if decision.stop:
                log.warning("rank %d: SIGTERM or stop request received; checkpoint at step %d saved, stopping", rank, state.step)
                break
    recorder.close()
    return record


def _validation_set(cfg: Config, run_dir: Path, rank: int):
    """The run's fixed validation set (``train.validate_every``), drawn once and kept in the run folder."""
    if not cfg.train.validate_every:
        return None
    from mim_scale.engine.validate import load_or_draw_validation_set

    return load_or_draw_validation_set(cfg, Path(run_dir), rank)


def _save(engine, scheduler, state: ckpt.TrainState, losses: dict[str, float], corrupt: CorruptCounter,
          reporter: Reporter, recorder: StepRecorder, record: dict[str, Any], rank: int, device) -> None:
    """A collective checkpoint of this step: every rank writes its part into the reporter's scratch folder, and
    the reporter commits it (rank 0 locally; Ray Train under Ray)."""
    state.losses = {k: v for k, v in losses.items() if math.isfinite(v)}
    state.scheduler_epoch = int(scheduler.last_epoch) if scheduler is not None else state.step
    state.corrupt_skipped += int(sum_over_ranks([corrupt.take_since_checkpoint()], device)[0])
    t_save = time.perf_counter()
    scratch = reporter.scratch_dir(state.step)
    nbytes = ckpt.save(engine, scratch, state, rank)
    recorder.checkpoint(time.perf_counter() - t_save, nbytes)
    reporter.report(record, scratch, rank)


def configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("MIM_SCALE_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
