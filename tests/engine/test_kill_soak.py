"""Slow soak (run by hand, reported): a 2-worker run SIGKILLed N times, each time a random worker at a random
step (``python -m mim_scale.engine.local`` relaunched after each kill, resuming from its last checkpoint),
ends with the fp32 model of a run that never failed, and no kill loses more than one checkpoint interval.

    MIM_SCALE_SOAK_KILLS=20 scripts/test.sh tests/engine/test_kill_soak.py -m slow -s
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from mim_scale.engine import checkpoint as ckpt
from mim_scale.engine.local import launch_local
from mim_scale.fileutil import read_jsonl

KILLS = int(os.environ.get("MIM_SCALE_SOAK_KILLS", "20"))
STEPS = int(os.environ.get("MIM_SCALE_SOAK_STEPS", "40"))
INTERVAL = 2  # train.checkpoint_every


def _workers(proc: subprocess.Popen) -> list:
    import psutil

    kids = psutil.Process(proc.pid).children()
    return [k for k in kids if "spawn_main" in " ".join(k.cmdline()) or "multiprocessing.spawn" in " ".join(k.cmdline())]


def _last_step(run_dir) -> int:
    records = read_jsonl(run_dir / "results" / "rank-0-steps.jsonl")  # to its last complete line
    return records[-1]["step"] if records else 0


def _committed_step(run_dir) -> int:
    try:
        return ckpt.TrainState.read(ckpt.latest_checkpoint(run_dir / "checkpoints")).step
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_random_sigkills_resume_to_the_failure_free_model(engine_shards, tiny_config, tmp_path):
    overrides = (f"train.steps={STEPS}", "train.zero_stage=2", "train.grad_accum=2",
                 f"train.checkpoint_every={INTERVAL}", "train.keep_last=2")
    cfg = tiny_config(engine_shards, *overrides)
    t0 = time.monotonic()
    launch_local(cfg, tmp_path / "straight", 2)
    straight_s = time.monotonic() - t0

    rng = random.Random(int(os.environ.get("MIM_SCALE_SOAK_SEED", "15")))
    run = tmp_path / "killed"
    argv = [sys.executable, "-m", "mim_scale.engine.local", "--config", "tiny", "--workers", "2", "--run-dir", str(run)]
    for o in ("data.shards=" + str(engine_shards), "data.crop_size=32", "model.view_size=16", "data.num_workers=1",
              "metrics.enabled=false", "train.warmup_steps=2", "train.lr=2e-3", *overrides):
        argv += ["--set", o]
    kills, lost, launches = [], [], 0
    t0 = time.monotonic()
    while True:
        launches += 1
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = _last_step(run)
        target = None
        if len(kills) < KILLS and start < STEPS - 1:
            # spread the kills over the steps still to run, never past the last one
            target = rng.randint(start + 1, min(STEPS - 1, start + 1 + max(1, (STEPS - start) // (KILLS - len(kills)))))
        while proc.poll() is None:
            if target is not None and _last_step(run) >= target:
                victims = _workers(proc)
                if victims:
                    victim = rng.choice(victims)
                    seen = _last_step(run)
                    os.kill(victim.pid, signal.SIGKILL)
                    proc.wait(timeout=120)
                    kills.append(seen)
                    lost.append(seen - _committed_step(run))
                    break
            time.sleep(0.05)
        proc.wait(timeout=600)
        if proc.returncode == 0 and _committed_step(run) == STEPS:
            break
        assert launches < KILLS + 10, "the killed run does not finish"
    soak_s = time.monotonic() - t0
    print(f"\nsoak: {len(kills)} SIGKILLs at steps {kills}; work lost per kill (steps past the last committed "
          f"checkpoint) {lost}; {launches} launches in {soak_s:.0f} s (failure-free run {straight_s:.0f} s)")
    assert len(kills) == KILLS
    assert max(lost) <= INTERVAL  # never more than one checkpoint interval (the step being saved may be lost too)

    a = ckpt.consolidated_state_dict(ckpt.latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = ckpt.consolidated_state_dict(ckpt.latest_checkpoint(run / "checkpoints"))
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)
    print(f"soak: largest relative difference to the failure-free fp32 model {worst:.2e}")
    assert worst <= 1e-6
    sa = ckpt.TrainState.read(ckpt.latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    sb = ckpt.TrainState.read(ckpt.latest_checkpoint(run / "checkpoints"))
    assert (sb.step, sb.samples_seen) == (sa.step, sa.samples_seen) and sb.restarts >= 1
