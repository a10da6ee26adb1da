"""Fault drills on the session's local Ray: a worker SIGKILLed mid-run, a worker killed while it writes a
checkpoint. Each faulted run must finish having resumed, and end on the same model as the failure-free
reference (same data schedule, fp32) within 1e-6 relative. Assertions read checkpoints, the run's step
history and its reported metrics, never log text."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from mim_scale.config import load_config
from mim_scale.engine import checkpoint as ckpt
from mim_scale.launcher.ray_train import pretrain
from mim_scale.launcher.runs import SNAPSHOT_FILE, committed_checkpoint, run_status

from launcher_drills import INTERVAL, STEPS, drill_overrides, max_relative_difference, model_of

TOLERANCE = 1e-6  # the engine's resume tolerance in fp32


def history_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "history.jsonl").read_text().splitlines()]


def assert_resumed_within_one_interval(steps: list[int]) -> None:
    assert steps[-1] == STEPS
    for a, b in zip(steps, steps[1:]):
        # consecutive steps, or a restart that went back at most to the previous checkpoint
        assert b == a + 1 or (b <= a and a - b < INTERVAL), steps


def test_worker_sigkill_at_random_step_resumes_and_matches(sample_shards, failure_free, tmp_path):
    rng = random.Random()
    rank, step = rng.randint(0, 1), rng.randint(2, STEPS)
    # MIM_SCALE_DRILL=kill:RANK:STEP replays one drill (a failing one is named in the assertion)
    drill = os.environ.get("MIM_SCALE_DRILL") or f"kill:{rank}:{step}"
    _, rank, step = drill.split(":")
    rank, step = int(rank), int(step)
    cfg = load_config("tiny", drill_overrides(sample_shards, tmp_path, "sigkill"))
    result = pretrain(cfg, fault=drill)
    assert result.error is None, (drill, result.error)

    state = ckpt.TrainState.read(result.checkpoint)
    assert (state.step, state.restarts) == (STEPS, 1), drill
    assert state.samples_seen == failure_free.metrics["samples_seen"] == STEPS * 2
    steps = history_steps(result.run_dir)
    assert_resumed_within_one_interval(steps)
    # the kill came as step `step` began; the restart went back to the checkpoint before it, so exactly
    # the steps between that checkpoint and the kill ran twice
    last_saved = (step - 1) // INTERVAL * INTERVAL
    repeated = sorted(k for k in set(steps) if steps.count(k) > 1)
    assert repeated == list(range(last_saved + 1, step)) and max(map(steps.count, steps)) <= 2, (drill, steps)
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    assert result.metrics["step"] == STEPS and result.metrics["total"] == result.metrics["total"]

    diff = max_relative_difference(model_of(result.checkpoint), model_of(failure_free.checkpoint))
    assert diff <= TOLERANCE, (drill, diff)

    # what an operator sees afterwards
    status = run_status(str(result.run_dir))
    assert status["state"] == "finished" and status["alive"] is False
    assert (status["step"], status["samples_seen"], status["restarts"]) == (STEPS, STEPS * 2, 1)
    assert status["checkpoint"]["step"] == STEPS and status["checkpoint"]["world_size"] == 2
    assert [w["rank"] for w in status["workers"]] == [0, 1]
    assert all(w["reachable"] is False for w in status["workers"])  # the run is over: /metrics are gone


@pytest.mark.parametrize("where", ["upload", pytest.param("write", marks=pytest.mark.slow)])
def test_crash_while_writing_checkpoint_keeps_previous_loadable(sample_shards, failure_free, tmp_path, where):
    """``upload``: rank 1 dies after writing its part, before handing it to Ray, while rank 0 puts its own
    part into the storage (an incomplete checkpoint folder); ``write``: rank 1 dies while DeepSpeed
    writes its files."""
    drill_step = 2 * INTERVAL
    cfg = load_config("tiny", drill_overrides(sample_shards, tmp_path, "ckpt-crash"))
    result = pretrain(cfg, ckpt_fault=f"{where}:1:{drill_step}")
    assert result.error is None, result.error

    steps = history_steps(result.run_dir)
    # rank 0 logged step 4 before the save began; the restart resumed from the step-2 checkpoint
    assert steps.count(INTERVAL + 1) == 2 and steps.count(drill_step) == 2, steps
    assert_resumed_within_one_interval(steps)
    state = ckpt.TrainState.read(result.checkpoint)
    assert (state.step, state.restarts) == (STEPS, 1)
    diff = max_relative_difference(model_of(result.checkpoint), model_of(failure_free.checkpoint))
    assert diff <= TOLERANCE, diff

    # every checkpoint Ray committed is complete and loads; nothing half-written is listed
    snapshot = json.loads((result.run_dir / SNAPSHOT_FILE).read_text())
    listed = [result.run_dir / r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    assert listed and all(p.is_dir() for p in listed)
    for path in listed:
        saved = ckpt.TrainState.read(path)
        assert saved.step % INTERVAL == 0
        assert all(v.isfinite().all() for v in model_of(path).values())
    assert Path(committed_checkpoint(str(result.run_dir))) == result.checkpoint
    # whatever the killed attempt left in the storage is not in Ray's list, so nothing resumes from it
    leftovers = sorted(set(result.run_dir.glob("checkpoint_*")) - set(listed))
    for path in leftovers:
        assert not (path / "mim").is_dir() or len(list((path / "mim").iterdir())) < len(list((listed[-1] / "mim").iterdir()))


def test_init_then_stop_request_saves_a_checkpoint_and_ends_the_run(sample_shards, failure_free, tmp_path):
    """Continued pre-training from an export (--init), stopped by `mim-scale stop` mid-run."""
    import threading
    import time

    from mim_scale.export import export_run, load_encoder
    from mim_scale.launcher.runs import request_stop

    export = export_run(failure_free.run_dir, tmp_path / "export")
    steps = 24  # more than the run reaches before the stop lands
    # a learning rate so small that the trained encoder must still be the exported one
    cfg = load_config("tiny", drill_overrides(sample_shards, tmp_path, "stopped", steps=steps) + ["train.lr=1e-9"])
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=pretrain(cfg, init=export)), daemon=True)
    thread.start()
    run_dir = tmp_path / "stopped"
    deadline = time.monotonic() + 300
    while committed_checkpoint(str(run_dir)) is None:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.2)
    assert run_status(str(run_dir), probe=True)["alive"] is True
    status = request_stop(str(run_dir), wait_seconds=240)
    thread.join(timeout=60)
    result = outcome["result"]
    assert result.error is None, result.error
    encoder, _ = load_encoder(export)
    trained = model_of(result.checkpoint)
    started_from = {k: v for k, v in encoder.state_dict().items()}
    from mim_scale.model import build_model

    fresh = build_model(cfg).encoder.state_dict()
    assert max_relative_difference(fresh, started_from) > 0.1  # the check below can tell the two apart
    assert max_relative_difference({k: trained["encoder." + k] for k in started_from}, started_from) < 1e-3
    state = ckpt.TrainState.read(result.checkpoint)
    assert INTERVAL <= state.step < steps
    assert history_steps(run_dir)[-1] == state.step  # the last step trained is the one saved
    assert status["state"] == "stopped" and status["checkpoint"]["step"] == state.step
    assert status["stop_requested"] is True


def test_init_is_checked_on_the_driver_before_any_worker_starts(failure_free, tmp_path):
    from mim_scale.errors import UserFacingError
    from mim_scale.export import export_run
    from mim_scale.launcher.ray_train import check_init

    export = export_run(failure_free.run_dir, tmp_path / "export")
    tiny = load_config("tiny")
    assert check_init(tiny, export) == export.resolve()
    with pytest.raises(UserFacingError, match="encoder.safetensors|missing|unexpected|shape"):
        check_init(load_config("tiny", ["model.encoder_depth=3"]), export)  # another architecture
    with pytest.raises(UserFacingError, match="no such export"):
        check_init(tiny, tmp_path / "nowhere")
    with pytest.raises(UserFacingError, match="no such export"):  # the launcher refuses it before Ray starts
        pretrain(tiny.replace({"data.shards": "x", "launch.storage": str(tmp_path)}), init=tmp_path / "nowhere")
