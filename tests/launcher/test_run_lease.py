"""The run lease: a second live launch of one run is refused naming the holder; a dead holder's lease is
taken over (at once when its pid is gone on this host, else once its heartbeat stops and goes stale), so
the documented re-run after a dead driver resumes; ``pretrain`` takes it before Ray starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mim_scale.launcher.lease import LEASE_FILE, RunLease, RunLeaseHeld, lease_state


def _holder(folder, **fields):
    now = time.time()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now - 100, "heartbeat": now,
              "token": "theirs", **fields}
    (folder / LEASE_FILE).write_text(json.dumps(record))
    return record


def test_second_live_launch_is_refused_naming_the_holder(tmp_path):
    first = RunLease.acquire(str(tmp_path), heartbeat_seconds=0.1, settle_seconds=0)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLeaseHeld) as err:
            RunLease.acquire(str(tmp_path), heartbeat_seconds=0.1, settle_seconds=0)
        assert time.monotonic() - t0 < 5  # refused as soon as the holder's heartbeat moved
        message = str(err.value)
        assert f"host {socket.gethostname()}" in message and f"pid {os.getpid()}" in message and "started 20" in message
        beat = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"]
        time.sleep(0.35)
        assert json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] > beat  # the heartbeat runs
    finally:
        first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    RunLease.acquire(str(tmp_path), settle_seconds=0).release()  # free again


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _holder(tmp_path, pid=int(proc.stdout))  # that process has exited
    assert lease_state(json.loads((tmp_path / LEASE_FILE).read_text())) == "stale"
    lease = RunLease.acquire(str(tmp_path), settle_seconds=0, wait=False)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == lease.token
    lease.release()


def test_silent_holder_elsewhere_is_taken_over_once_stale(tmp_path):
    """A driver on another host died with a fresh heartbeat: the re-run waits for it to go stale."""
    _holder(tmp_path, host="other-host", pid=1)
    with pytest.raises(RunLeaseHeld, match="host other-host, pid 1"):
        RunLease.acquire(str(tmp_path), stale_seconds=1.0, settle_seconds=0, wait=False)
    t0 = time.monotonic()
    lease = RunLease.acquire(str(tmp_path), stale_seconds=1.0, heartbeat_seconds=0.2, settle_seconds=0)
    assert 0.5 < time.monotonic() - t0 < 10
    assert json.loads((tmp_path / LEASE_FILE).read_text())["host"] == socket.gethostname()
    lease.release()


def test_pretrain_refuses_a_held_run_before_ray_starts(tmp_path, monkeypatch):
    from mim_scale.config import load_config
    from mim_scale.launcher import ray_train
    from mim_scale.launcher.ray_train import pretrain

    def no_ray(*_args, **_kwargs):  # (another test's session cluster may already be up: watch the call itself)
        raise AssertionError("pretrain reached Ray start-up with the run held by another launch")

    monkeypatch.setattr(ray_train, "ensure_ray", no_ray)

    run = tmp_path / "runs" / "held"
    run.mkdir(parents=True)
    _holder(run, host="head-0", pid=4242)  # fresh heartbeat from another host, and it keeps beating:
    stop = time.time() + 30

    def beat():
        while time.time() < stop and (run / LEASE_FILE).exists():
            record = json.loads((run / LEASE_FILE).read_text())
            record["heartbeat"] = time.time()
            tmp = run / (LEASE_FILE + ".beat")  # atomically, as a real holder writes: a reader never sees half
            tmp.write_text(json.dumps(record))
            os.replace(tmp, run / LEASE_FILE)
            time.sleep(0.2)

    import threading

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    cfg = load_config("tiny", [f"launch.storage={tmp_path / 'runs'}", "launch.name=held"])
    with pytest.raises(RunLeaseHeld, match="host head-0, pid 4242"):
        pretrain(cfg)
    stop = 0
