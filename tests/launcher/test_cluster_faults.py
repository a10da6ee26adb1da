"""Losing a node and losing the driver. Both start their own Ray in a child process (a multi-node
``ray.cluster_utils.Cluster``; a ``mim-scale pretrain`` that starts a local cluster) with a private
RAY_TMPDIR, so neither meets the session's Ray. Assertions read the run folder: checkpoints (state.json),
the step history, and the launcher's records; never log text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mim_scale.engine import checkpoint as ckpt
from mim_scale.launcher.runs import committed_checkpoint, run_status

from launcher_drills import INTERVAL, PYTHON, drill_overrides

HERE = Path(__file__).parent


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "history.jsonl").read_text().splitlines()]


def _never_back_more_than_one_interval(steps: list[int]) -> None:
    for a, b in zip(steps, steps[1:]):
        assert b == a + 1 or (b <= a and a - b < INTERVAL), steps


def _kill_group(proc: subprocess.Popen) -> None:
    """End what this test started: the child and everything in its session (Ray it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["elastic", "wait"])
def test_node_loss_resumes_on_what_remains_or_waits_for_capacity(sample_shards, tmp_path, child_env, mode):
    storage, name = tmp_path / "runs", f"node-loss-{mode}"
    proc = subprocess.Popen([PYTHON, str(HERE / "node_loss_drill.py"), str(sample_shards), str(storage), name, mode],
                            env=child_env, cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=1200)
    finally:
        _kill_group(proc)
    lines = [line for line in out.splitlines() if line.startswith("DRILL ")]
    assert proc.returncode == 0 and lines, out[-3000:]
    report = json.loads(lines[-1][len("DRILL "):])
    assert report["finished"], report
    state = ckpt.TrainState.read(Path(report["checkpoint"]))
    steps = _steps(storage / name)
    drill_steps = 10  # node_loss_drill.STEPS
    assert state.step == drill_steps and steps[-1] == drill_steps
    assert state.restarts >= 1
    assert state.samples_seen == drill_steps * 2  # the global batch never changed
    _never_back_more_than_one_interval(steps)
    if mode == "elastic":
        # it went on with the one node left: one worker, twice the accumulation
        assert (state.world_size, state.grad_accum) == (1, 2), state
    else:
        assert report["step_while_waiting"] <= report["removed_after_step"] + 1  # no progress without capacity
        assert (state.world_size, state.grad_accum) == (2, 1), state


@pytest.mark.slow
def test_driver_killed_then_same_command_resumes(sample_shards, tmp_path, child_env):
    storage, name = tmp_path / "runs", "driver-kill"
    steps = 10
    argv = [PYTHON, "-m", "mim_scale.cli", "pretrain", "--json", "--config", "tiny", "--name", name,
            "--storage", str(storage), "--workers", "2"]
    for item in drill_overrides(sample_shards, storage, name, steps=steps):
        argv += ["--set", item]
    env = child_env
    run_dir = storage / name

    first = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while committed_checkpoint(str(run_dir)) is None:
            assert first.poll() is None and time.monotonic() < deadline, "the first launch ended before a checkpoint"
            time.sleep(0.5)
        status = run_status(str(run_dir), probe=False)
        assert status["state"] == "running" and status["alive"] is True
        first.send_signal(signal.SIGKILL)  # the driver only; its Ray processes are left to fend for themselves
        first.wait(timeout=30)
        killed_at = ckpt.TrainState.read(Path(committed_checkpoint(str(run_dir)))).step
        status = run_status(str(run_dir), probe=False)
        assert status["state"] == "driver lost" and status["alive"] is False
    finally:
        _kill_group(first)  # whatever the dead driver left behind
    assert killed_at < steps

    second = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            start_new_session=True)
    assert second.returncode == 0, second.stderr[-3000:]
    final = Path(json.loads(second.stdout[second.stdout.index("{"):])["checkpoint"])
    state = ckpt.TrainState.read(final)
    assert state.step == steps and state.samples_seen == steps * 2
    assert state.restarts >= 1  # the second launch started from a checkpoint, not from scratch
    history = _steps(run_dir)
    _never_back_more_than_one_interval(history)
    status = run_status(str(run_dir), probe=False)
    assert status["state"] == "finished" and status["driver"]["launches"] == 2
    assert status["checkpoint"]["step"] == steps
