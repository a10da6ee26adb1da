"""How a Ray Train worker hands over metrics and checkpoints (:class:`RayReporter`), and the checkpoint-write
failure drills (``write:RANK:STEP``, ``upload:RANK:STEP``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from mim_scale.engine.drills import parse_drill
from mim_scale.engine.reporter import Reporter
from mim_scale.launcher.runs import STOP_FILE

log = logging.getLogger("mim_scale.launcher")

# How long a worker waits, after a save, for Ray to list the checkpoint as committed (see RayReporter).
COMMIT_WAIT_SECONDS = float(os.environ.get("MIM_SCALE_COMMIT_WAIT_SECONDS", "120"))


class RayReporter(Reporter):
    """Checkpoints go through ``ray.train.report``: each rank hands over its own files, Ray merges them.

    ``stop_requested()`` is true once ``mim-scale stop`` wrote the run's stop request (see
    :mod:`mim_scale.launcher.runs`); a background thread polls for it so a step costs no file-system call.
    ``ckpt_fault`` (drills only, on a worker that started fresh, not after a restart) SIGKILLs rank RANK
    in the middle of saving step STEP: ``write:RANK:STEP`` while it writes its files,
    ``upload:RANK:STEP`` after it wrote them and before it hands them to Ray (the other ranks upload
    theirs: the storage then holds an incomplete checkpoint folder that Ray never commits).
    """

    def __init__(self, run_dir: Path, *, stop_uri: str | None = None, ckpt_fault: str | None = None,
                 rank: int = 0, poll_seconds: float = 2.0, run_uri: str | None = None, files=None):
        super().__init__(run_dir, files=files)
        self._run_uri = run_uri  # STORAGE/NAME, where Ray keeps the run's checkpoints and their list
        self._stack = ExitStack()
        self._scratch: Path | None = None
        self._rank = rank
        self._resumed = False
        self._ckpt_fault = parse_ckpt_fault(ckpt_fault)
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._stop_paths = [str(Path(run_dir) / STOP_FILE)] + ([f"{stop_uri.rstrip('/')}/{STOP_FILE}"] if stop_uri else [])
        self._poller = threading.Thread(target=self._poll_stop, args=(poll_seconds,), daemon=True,
                                        name="mim-stop-poller")
        self._poller.start()

    def _poll_stop(self, every: float) -> None:
        from mim_scale.launcher.runs import path_exists

        while not self._closed.wait(every):
            if any(path_exists(p) for p in self._stop_paths):
                log.warning("rank %d: stop requested (%s); stopping after the next checkpoint", self._rank,
                            self._stop_paths[0])
                self._stop.set()
                return

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def resume_dir(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._resumed = True
        return Path(self._stack.enter_context(checkpoint.as_directory()))

    def scratch_dir(self, step: int) -> Path:
        self._scratch = Path(tempfile.mkdtemp(prefix=f"mim-ckpt-{step}-"))
        fault = self._ckpt_fault
        if fault == ("write", self._rank, step) and not self._resumed:
            threading.Thread(target=_kill_when_written, args=(self._scratch,), daemon=True).start()
        return self._scratch

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None, rank: int) -> None:
        import ray.train
        from ray.train import Checkpoint

        clean = {k: v for k, v in metrics.items() if v is not None}
        if ckpt_dir is None:
            ray.train.report(clean)
            return
        if self._ckpt_fault == ("upload", self._rank, metrics["step"]) and not self._resumed:
            log.warning("injecting fault: SIGKILL before handing %s to Ray", ckpt_dir)
            os.kill(os.getpid(), signal.SIGKILL)
        ray.train.report(clean, checkpoint=Checkpoint.from_directory(str(ckpt_dir)))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if self._run_uri:
            self._wait_committed(int(metrics["step"]))

    def _wait_committed(self, step: int) -> None:
        """Block until Ray's controller lists this step's checkpoint as committed.

        ``report()`` returns once the files are uploaded, but the controller registers them only at its
        next poll of the workers (every ~2 s): a worker lost before that poll would send the restart back
        to the checkpoint before, one interval further than it should. Waiting here makes every step
        after a save start from a committed checkpoint. All ranks wait (any of them could be the one lost).
        """
        from mim_scale.launcher.runs import SNAPSHOT_FILE, read_text

        path = f"{self._run_uri.rstrip('/')}/{SNAPSHOT_FILE}"
        deadline = time.monotonic() + COMMIT_WAIT_SECONDS
        while time.monotonic() < deadline:
            text = read_text(path)
            try:
                latest = (json.loads(text) if text else {}).get("latest_checkpoint_result") or {}
            except json.JSONDecodeError:  # the controller is replacing it
                latest = {}
            if int((latest.get("metrics") or {}).get("step", -1)) >= step:
                return
            time.sleep(0.1)
        log.warning("rank %d: the step-%d checkpoint was not listed as committed within %.0f s; going on",
                    self._rank, step, COMMIT_WAIT_SECONDS)

    def close(self) -> None:
        self._closed.set()
        self._stack.close()


def parse_ckpt_fault(spec: str | None) -> tuple[str, int, int] | None:
    """``write:RANK:STEP`` or ``upload:RANK:STEP`` (see :class:`RayReporter`)."""
    return parse_drill(spec, ("write", "upload"), "checkpoint fault")


def _kill_when_written(folder: Path) -> None:
    """SIGKILL this process as soon as the checkpoint being written into ``folder`` has its first bytes."""
    while True:
        if any(p.is_file() and p.stat().st_size > 0 for p in folder.rglob("*")):
            log.warning("injecting fault: SIGKILL while writing %s", folder)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.001)
