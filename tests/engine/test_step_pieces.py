"""The training loop's small pieces on their own (one process, no DeepSpeed): corrupt-sample counting from crop
meta, the agreed save/stop decision, and how a step is counted into the run's state."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from mim_scale.config import load_config
from mim_scale.engine.checkpoint import TrainState
from mim_scale.engine.save_agreement import SaveAgreement
from mim_scale.engine.step import CorruptCounter, StepResult, reduce_step
from mim_scale.metrics import TrainMetrics


def _meta(worker: int, corrupt: int, shard: str = "train-000001.tar") -> dict:
    return {"worker": worker, "corrupt": corrupt, "shard": shard, "key": "k", "pick": 0, "crop_index": 0}


def test_corrupt_counter_counts_each_loader_workers_running_total_once():
    metrics = TrainMetrics("r", 0, serve=False)
    counter = CorruptCounter(metrics)
    for meta in (_meta(0, 0), _meta(1, 2), _meta(0, 1), _meta(1, 2), _meta(0, 1)):
        counter.observe(meta)
    assert counter.since_start == 3  # worker 1 reported 2, worker 0 then 1; repeats are not new
    assert metrics.sample("mim_corrupt_samples_skipped_total", reason="decode_error") == 3
    assert counter.take_since_checkpoint() == 3 and counter.take_since_checkpoint() == 0
    counter.observe(_meta(0, 4))
    assert (counter.since_checkpoint, counter.since_start) == (3, 6)


def test_save_agreement_on_one_process():
    cfg = load_config("tiny", overrides=["train.steps=10", "train.checkpoint_every=4", "train.checkpoint_minutes=0"])
    stop = {"asked": False}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        _decide_in_turn(SaveAgreement(cfg, lambda: stop["asked"]), stop)
    finally:
        signal.signal(signal.SIGTERM, previous)  # the agreement installed its own handler


def _decide_in_turn(agreement: SaveAgreement, stop: dict) -> None:
    cpu = torch.device("cpu")
    assert not agreement.decide(3, {"total": 1.0}, cpu).save
    assert agreement.decide(4, {"total": 1.0}, cpu).save  # every checkpoint_every steps
    assert agreement.decide(10, {"total": 1.0}, cpu).save  # the last step
    nan = agreement.decide(5, {"total": math.nan}, cpu)
    assert nan.nonfinite and not nan.save
    stop["asked"] = True  # `mim-scale stop`: save now, then end
    asked = agreement.decide(5, {"total": 1.0}, cpu)
    assert asked.save and asked.stop
    stop["asked"] = False
    os.kill(os.getpid(), signal.SIGTERM)  # the handler sets a flag; the ranks agree on it at the next step
    assert agreement.decide(6, {"total": 1.0}, cpu).stop


def test_reduce_step_counts_units_into_the_state():
    state = TrainState(world_size=1, micro_batch=2, grad_accum=3)
    step = StepResult(losses={"total": 2.0, "z_std_12": 0.5}, crops=6, volume_reads=4, views=6 * 21, tokens=6 * 100,
                      step_seconds=1.0, data_wait_seconds=0.1, data_digest="d", last_crops=torch.zeros(1))
    losses = reduce_step(step, state, world=1, device=torch.device("cpu"))
    assert losses == pytest.approx({"total": 2.0, "z_std_12": 0.5})
    assert (state.step, state.samples_seen, state.volumes_seen, state.views_seen, state.tokens_seen) == \
        (1, 6, 4, 126, 600)
