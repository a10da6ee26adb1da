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


# Ray 2.60's account of a SIGKILLed worker, as a drill recorded it (`--fault kill:1:5`): a worker record dump,
# then the death cause
RAY_DEATH = """The actor died unexpectedly before finishing this task.
\tclass_name: RayTrainWorker
\tactor_id: 67df70c8bd5cd345c5ab03db01000000
\tpid: 5595
\tip: 192.0.2.2
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker \
unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the process was \
killed by the OOM killer due to high memory usage, (2) ray stop --force was called"""


def test_a_killed_worker_is_reported_with_rays_reason_first(tmp_path):
    class HealthCheckFailed(Exception):  # what the controller holds for a dead worker process
        def __init__(self, message, failure):
            super().__init__(message)
            self.health_check_failure = failure

    died = describe_failure(HealthCheckFailed("A worker health check failed.\nWorker info: Worker(\n  actor=Actor("
                                              "RayTrainWorker, 67df)\n)", RuntimeError(RAY_DEATH)))
    assert died["kind"] == "died"
    survivor = {"kind": "error", "type": "RuntimeError", "traceback": "Traceback ...\n  dist.all_reduce(...)",
                "message": "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:23748: Connection reset by peer."}
    stream = io.StringIO()
    watcher = RunWatcher(tmp_path, 4, Progress("pretrain", 4, stream=stream))
    _event(tmp_path, {"event": "failure", "ranks": {"0": survivor, "1": died}})
    watcher.poll()
    lines = [ln for ln in stream.getvalue().splitlines() if not ln.startswith("pretrain ")]
    # the cause first, with Ray's reason and no dump of its worker record; the survivor in one line after it
    assert lines[0].startswith("worker rank 1 died without a Python error")
    assert lines[1] == ("    Ray: exit type SYSTEM_ERROR: Worker unexpectedly exits with a connection error code 2. "
                        "End of file.")
    assert lines[2] == f"    full log: {tmp_path / 'logs' / 'rank-1.log'}"
    assert lines[3].startswith("worker rank 0 failed as a result (RuntimeError: [gloo") and "rank-0.log" in lines[3]
    assert not any(re.search(r"\w+\(\w+=", ln) for ln in lines)
