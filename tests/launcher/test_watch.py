"""The driver's progress line and failure report (mim_scale.launcher.watch), from a run folder as the workers and
Ray's controller fill it: history lines, the attempts count, the controller's events."""

from __future__ import annotations

import io
import json
import pickle
import re

from mim_scale import rundir
from mim_scale.console import Progress
from mim_scale.launcher.watch import RunWatcher, describe_failure


def _history(run, **record):
    with open(run / rundir.HISTORY_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _event(run, event):
    (run / rundir.LOGS_DIR).mkdir(exist_ok=True)
    with open(run / rundir.EVENTS_FILE, "a") as f:
        f.write(json.dumps(event) + "\n")


def _worker_error() -> BaseException:
    """An exception as the controller's callback receives it: raised in a worker, its traceback text attached
    by train_worker, pickled across processes (which drops __traceback__)."""
    from mim_scale.launcher.ray_train import _keep_traceback

    def inject():
        raise RuntimeError("injected fault on rank 1 at step 9")

    try:
        inject()
    except RuntimeError as exc:
        _keep_traceback(exc)
        return pickle.loads(pickle.dumps(exc))


def test_progress_and_failures_from_the_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stream = io.StringIO()
    progress = Progress("pretrain", 12, stream=stream, plain_every_s=0)
    watcher = RunWatcher(run, 12, progress)
    (run / rundir.ATTEMPTS_FILE).write_text("1")
    for step in range(1, 7):
        _history(run, step=step, crops_per_step=4, step_seconds=0.5, data_wait_seconds=0.01, total=3.4,
                 rec_l1=1.0, rec_l2=1.1, rec_l3=0.9, align_12=1.8, align_23=1.9)
    _event(run, {"event": "checkpoint", "step": 6, "path": "/x/checkpoint_1"})
    watcher.poll()
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("pretrain 6/12 steps ")
    for part in ("8.0 crops/s", "loss 3.40 rec 1.00/1.10/0.90", "wait 0.01s",
                 "ETA ", "ckpt 6", "restarts 0"):
        assert part in line, (part, line)

    exc = _worker_error()
    _event(run, {"event": "failure", "ranks": {"1": describe_failure(exc)}})
    (run / rundir.ATTEMPTS_FILE).write_text("2")
    _history(run, step=7, crops_per_step=4, step_seconds=0.5, total=3.3)
    watcher.poll()
    # the same failure again (the final error report): printed once
    watcher.show_failure(1, describe_failure(exc), tail=None)
    watcher.stop()
    progress.close()
    text = stream.getvalue()
    assert text.count("worker rank 1 failed: RuntimeError: injected fault on rank 1 at step 9") == 1
    assert re.search(r'File ".*test_watch.py", line \d+, in inject', text)  # the worker's own traceback
    assert f"full log: {run / 'logs' / 'rank-1.log'}" in text
    assert "restart 1: the worker group starts again from the step-6 checkpoint" in text
    assert text.splitlines()[-1].startswith("pretrain 7/12 steps") and "restarts 1" in text.splitlines()[-1]
    assert "\r" not in text


def test_a_killed_worker_is_reported_with_rays_reason(tmp_path):
    class Died(Exception):
        health_check_failure = RuntimeError("ActorDiedError")

    failure = describe_failure(Died("Worker health check failed.\nThe actor died: killed by the memory monitor "
                                    "(out of memory)"))
    assert failure["kind"] == "died"
    stream = io.StringIO()
    watcher = RunWatcher(tmp_path, 4, Progress("pretrain", 4, stream=stream))
    watcher.show_failure(0, failure, tail=10)
    text = stream.getvalue()
    assert "worker rank 0 died" in text and "killed by the memory monitor (out of memory)" in text
    assert "rank-0.log" in text
