"""The driver's view of a pre-training run while it trains: one progress line, and every failure.

Everything comes from what the workers and Ray's controller report into the driver's run folder
(:mod:`mim_scale.rundir`), never from log text:

- ``history.jsonl``: rank 0's step records (step, crops per step, step time, data wait, losses; every
  ``train.log_every`` steps and at each checkpoint), through the workers' run-folder actor;
- ``attempts``: how many times the worker group started (a restart is a new start);
- ``logs/events.jsonl``: what Ray Train's controller saw, written by :class:`ControllerEvents` (a
  ``ray.train.UserCallback``, run in the controller): each committed checkpoint, and each worker failure with
  the worker's own traceback (a Python error) or Ray's account of the process's death (an OOM kill, a
  SIGKILL, a lost node).

:class:`RunWatcher` polls them from a thread and draws a :class:`mim_scale.console.Progress` line:
step/total, crops/s, total and per-level reconstruction loss, data wait, ETA, last checkpoint, restarts. A failure is printed above the line
at once with the tail of its traceback and the log file that holds the rest (``logs/rank-N.log``).
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from mim_scale import rundir
from mim_scale.console import Progress, fmt_seconds

TRACEBACK_TAIL_LINES = 10  # the innermost frames and the error; the worker's log file has all of it


def describe_failure(exc: BaseException) -> dict[str, str]:
    """A worker failure as Ray Train's controller holds it -> {kind, type, message, traceback} (plain text).

    A Python error in the worker arrives wrapped with its traceback text; a process that died (OOM killer,
    SIGKILL, its node gone) arrives as a failed health check holding Ray's death cause."""
    base = getattr(exc, "_base_exc", None)  # ray.train's UserExceptionWithTraceback: str() is the traceback
    if isinstance(base, BaseException):
        return {"kind": "error", "type": type(base).__name__, "message": str(base).strip(),
                "traceback": str(getattr(base, "mim_traceback", None) or exc).strip()}
    died = getattr(exc, "health_check_failure", None)  # WorkerHealthCheckFailedError
    if died is not None:  # its own text opens with a dump of Ray's worker record: keep the death cause only
        return {"kind": "died", "type": type(died).__name__, "message": death_cause(str(died)), "traceback": ""}
    # the bare exception (what the controller's callbacks get); train_worker attached its traceback text
    return {"kind": "error", "type": type(exc).__name__, "message": str(exc).strip(),
            "traceback": str(getattr(exc, "mim_traceback", "") or "").strip()}


_EXIT = re.compile(r"Worker exit type: *(\S+) *Worker exit detail: *(.*?)(?= Some common causes|\n|$)", re.S)
# a survivor's error when a peer vanished mid-collective: a consequence of another rank's failure
_LOST_PEER = re.compile(r"gloo|NCCL|Connection (reset|closed)|connection refused|Broken pipe|timed? ?out", re.I)


def death_cause(text: str) -> str:
    """Why Ray says a worker process died (``Worker exit type: ... detail: ...``: the OOM killer, a signal, a
    lost node), without the actor and worker attribute dumps around it."""
    m = _EXIT.search(text)
    if m:
        return f"exit type {m.group(1)}: {' '.join(m.group(2).split())}"
    plain = [ln.strip() for ln in text.splitlines() if ln.strip() and "=" not in ln and not ln.startswith("\t")]
    return plain[0] if plain else "no reason given"


def is_consequence(failure: dict[str, str]) -> bool:
    """A Python error that says a collective lost its peer (gloo/NCCL connection reset, timeout)."""
    return failure.get("kind") == "error" and bool(_LOST_PEER.search(failure.get("message", "")))


class ControllerEvents(UserCallback):
    """Runs in Ray Train's controller: appends checkpoints and worker failures to the driver's
    ``logs/events.jsonl`` through the run-folder actor (:mod:`mim_scale.launcher.driver_files`).
    Calls are sent without waiting (the controller's loop is asynchronous); one caller's calls keep their order."""

    def __init__(self, run_files_actor):
        self._actor = run_files_actor

    def _append(self, event: dict[str, Any]) -> None:
        event["time"] = time.time()
        try:
            self._actor.call.remote("append_line", rundir.EVENTS_FILE, json.dumps(event, default=str))
        except Exception:  # noqa: BLE001 - the progress display must never fail the run
            pass

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None:
            return
        step = next((m.get("step") for m in metrics if isinstance(m, dict) and "step" in m), None)
        self._append({"event": "checkpoint", "step": step, "path": getattr(checkpoint, "path", None)})

    def after_exception(self, run_context, worker_exceptions: dict[int, BaseException]) -> None:
        self._append({"event": "failure",
                      "ranks": {str(rank): describe_failure(exc) for rank, exc in sorted(worker_exceptions.items())}})


def format_failure(run_dir: Path, rank: int | str, failure: dict[str, str], *, tail: int | None) -> list[str]:
    """Lines for one worker's failure: what failed, the traceback (its last ``tail`` lines; all if None; one
    line in all when 0), and the log file with the rest."""
    log_file = Path(run_dir) / rundir.worker_log(int(rank))
    if failure.get("kind") == "died":
        lines = [f"worker rank {rank} died without a Python error (the system killed it: out of memory, a signal, "
                 "or its node was lost)", f"    Ray: {failure.get('message', '')}"]
    elif tail == 0:  # a consequence of another rank's failure
        return [f"worker rank {rank} failed as a result ({failure.get('type')}: "
                f"{_first_line(failure.get('message', ''))[:120]}); log: {log_file}"]
    else:
        lines = [f"worker rank {rank} failed: {failure.get('type')}: {_first_line(failure.get('message', ''))}"]
        tb = [ln for ln in failure.get("traceback", "").splitlines() if ln.strip()]
        if tail is not None:
            tb = tb[-tail:]
        lines += [f"    {ln}" for ln in tb]
    lines.append(f"    full log: {log_file}")
    return lines


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


class _Tail:
    """New whole lines of a growing file (a line still being written is left for the next read)."""

    def __init__(self, path: Path, from_end: bool):
        self.path = path
        self.offset = path.stat().st_size if from_end and path.is_file() else 0

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < self.offset:  # cut back (a torn last line removed): continue from there
                    self.offset = size
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [ln for ln in data[:end].decode("utf-8", "replace").splitlines() if ln.strip()]


class RunWatcher:
    """Polls a run folder from a thread and keeps a :class:`Progress` line up to date (see the module doc).

    ``shown``: (rank, type, message) of every failure already printed, so the driver's final error report
    does not print one twice."""

    def __init__(self, run_dir: Path, total_steps: int, progress: Progress, *, poll_seconds: float = 0.5):
        self.run_dir = Path(run_dir)
        self.total = int(total_steps)
        self.progress = progress
        self.poll_seconds = poll_seconds
        self.shown: set[tuple[str, str, str]] = set()
        self.failures = 0
        self.last_checkpoint: int | None = None
        self.record: dict[str, Any] = {}
        self._history = _Tail(self.run_dir / rundir.HISTORY_FILE, from_end=False)
        self._events = _Tail(self.run_dir / rundir.EVENTS_FILE, from_end=True)  # this launch's events only
        self._attempts0 = self._attempts()
        self._attempts_seen = self._attempts0
        self._rate_origin: tuple[float, int] | None = None
        self._status = "starting the workers"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mim-run-watcher")
        self._history_initial()

    def _history_initial(self) -> None:
        for line in self._history.lines():  # a resumed run: start the line where it stands
            self._take(line)
        self._rate_origin = None

    def start(self) -> RunWatcher:
        self._draw()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.poll()  # what arrived after the last poll

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - never break the run over its display
                pass

    def _attempts(self) -> int:
        try:
            return int((self.run_dir / rundir.ATTEMPTS_FILE).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def restarts(self) -> int:
        """Restarts of this run so far (the loop's count: every start after the first)."""
        return max(0, self._attempts_seen - 1)

    def poll(self) -> None:
        with self._lock:
            for line in self._events.lines():
                self._event(line)
            attempts = self._attempts()
            if attempts > self._attempts_seen:
                if self._attempts_seen > self._attempts0:  # not this launch's first start: a restart
                    start = (f"from the step-{self.last_checkpoint} checkpoint" if self.last_checkpoint
                             else "from step 0 (no checkpoint yet)")
                    self.progress.write(f"restart {attempts - 1}: the worker group starts again {start}")
                self._attempts_seen = attempts
                self._rate_origin = None
                self._status = "building the engines"
            for line in self._history.lines():
                self._take(line)
            self._draw()

    def _event(self, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        if event.get("event") == "checkpoint" and event.get("step") is not None:
            self.last_checkpoint = int(event["step"])
        elif event.get("event") == "failure":
            ranks = event.get("ranks") or {}
            # a death or a plain error first; ranks that only lost their peer in a collective, one line each
            causes = {r: f for r, f in ranks.items() if not is_consequence(f)}
            for rank, failure in (causes or ranks).items():
                self.show_failure(rank, failure, tail=TRACEBACK_TAIL_LINES)
            for rank, failure in ranks.items():
                if causes and rank not in causes:
                    self.show_failure(rank, failure, tail=0)

    def show_failure(self, rank: int | str, failure: dict[str, str], *, tail: int | None) -> None:
        key = (str(rank), failure.get("type", ""), _first_line(failure.get("message", "")))
        if key in self.shown:
            return
        self.shown.add(key)
        self.failures += 1
        for text in format_failure(self.run_dir, rank, failure, tail=tail):
            self.progress.write(text)

    def _take(self, line: str) -> None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return
        if not isinstance(record, dict) or "step" not in record:
            return
        self.record = record
        now, step = time.monotonic(), int(record["step"])
        if self._rate_origin is None or step < self._rate_origin[1]:
            self._rate_origin = (now, step)
        self._status = ""

    def _eta_seconds(self, step: int) -> float | None:
        remaining = self.total - step
        if remaining <= 0:
            return 0.0
        if self._rate_origin is not None:
            t0, s0 = self._rate_origin
            if step > s0 and time.monotonic() > t0:
                return remaining * (time.monotonic() - t0) / (step - s0)
        seconds = self.record.get("step_seconds")
        return remaining * float(seconds) if seconds else None

    def text(self) -> str:
        """The figures beside the bar."""
        r = self.record
        parts = []
        if self._status or not r:
            parts.append(self._status or "starting the workers")
        if r:
            step_s = r.get("step_seconds")
            if step_s and r.get("crops_per_step"):
                parts.append(f"{float(r['crops_per_step']) / float(step_s):.1f} crops/s")
            if "total" in r:  # the total, and the reconstruction loss per level (alignment: history, TensorBoard)
                rec = "/".join(f"{float(r[k]):.2f}" for k in sorted(r) if k.startswith("rec_"))
                parts.append(f"loss {float(r['total']):.2f}" + (f" rec {rec}" if rec else ""))
            if r.get("data_wait_seconds") is not None:
                parts.append(f"wait {float(r['data_wait_seconds']):.2f}s")
            parts.append(f"ETA {fmt_seconds(self._eta_seconds(int(r['step'])))}")
        parts.append(f"ckpt {self.last_checkpoint if self.last_checkpoint is not None else '-'}")
        parts.append(f"restarts {self.restarts()}")
        return "  ".join(parts)  # fits a 120-column terminal beside the bar

    def _draw(self) -> None:
        self.progress.update(int(self.record.get("step", 0)) if self.record else None, self.text())
