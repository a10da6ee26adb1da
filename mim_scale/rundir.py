"""Every name in a run folder, and the one way workers write into the driver's copy of it.

A run folder (``STORAGE/NAME`` on a shared file system; ``./runs/NAME`` beside the driver when the storage is an
object store) holds what Ray Train persists and what the launcher and the workers add::

    launcher.json                  the driver: state, host, pid, Ray address        (DRIVER_FILE)
    lease.json                     the live launch's lease                           (launcher.lease)
    STOP                           a stop request (``mim-scale stop``)               (STOP_FILE)
    checkpoint_manager_snapshot.json  Ray's list of committed checkpoints           (SNAPSHOT_FILE)
    checkpoints/step_*             checkpoints of a run without Ray                  (checkpoint_name)
    checkpoints/step_*.tmp         a save in progress (removed at the next start)    (checkpoint_scratch_name)
                                   (a fine-tuning run's checkpoints/step_* too: step_checkpoints finds both)
    .fault-fired-*                 a failure drill that already fired                (fault_marker)
    recipe.json                    the batch, lr and schedule the run trains with    (RECIPE_FILE)
    attempts                       how many times the workers started                (ATTEMPTS_FILE)
    history.jsonl                  one line per logged step (rank 0)                 (HISTORY_FILE)
    workers/rank-N.json            where each worker of the current group runs       (worker_record)
    prometheus_targets/rank-N.json each worker's /metrics address (file_sd)          (targets_file)
    monitor/                       ``mim-scale monitor``'s Prometheus config and data (MONITOR_DIR)
    pictures/                      reconstruction and loss-curve PNGs                (PICTURES_DIR)
    logs/driver.log                the driver's full log (the terminal shows a summary) (DRIVER_LOG)
    logs/rank-N.log                worker N's stdout and stderr, every attempt       (worker_log)
    logs/events.jsonl              what Ray's controller saw: checkpoints, worker failures (EVENTS_FILE)
    logs/ray                       a link to Ray's own session logs on the driver's node (RAY_LOGS_LINK)

Workers on other machines must not write these files to their own disk: a worker writes through a
:class:`RunFiles`. The local one (this module) writes into a folder; under Ray the launcher hands every worker a
proxy to an actor pinned to the driver's node (:mod:`mim_scale.launcher.driver_files`), so targets, history,
worker records and restart counts land in the driver's run folder whatever the storage. Names are checked
(:func:`check_name`): a relative path inside the folder, under one of the names above.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DRIVER_FILE = "launcher.json"
STOP_FILE = "STOP"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINTS_DIR = "checkpoints"
RECIPE_FILE = "recipe.json"
ATTEMPTS_FILE = "attempts"
HISTORY_FILE = "history.jsonl"
WORKERS_DIR = "workers"
TARGETS_DIR = "prometheus_targets"
MONITOR_DIR = "monitor"
PICTURES_DIR = "pictures"
LOGS_DIR = "logs"
DRIVER_LOG = f"{LOGS_DIR}/driver.log"
EVENTS_FILE = f"{LOGS_DIR}/events.jsonl"
RAY_LOGS_LINK = f"{LOGS_DIR}/ray"
SCRATCH_SUFFIX = ".tmp"
REHEARSAL_SUFFIX = "-rehearsal"  # `pretrain --rehearse` runs in STORAGE/NAME-rehearsal-<UTC time>

# what a worker may write into the driver's run folder (first path part)
WORKER_WRITABLE = (RECIPE_FILE, ATTEMPTS_FILE, HISTORY_FILE, WORKERS_DIR, TARGETS_DIR, PICTURES_DIR, LOGS_DIR)
_RANK_FILE = re.compile(r"^rank-(\d{1,6})\.json$")
_PART = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]{0,127}$")


def checkpoint_name(step: int) -> str:
    """``checkpoints/step_000000042``: the committed checkpoint of optimizer step ``step`` (runs without Ray)."""
    return f"{CHECKPOINTS_DIR}/step_{int(step):09d}"


_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_of(folder: str | os.PathLike) -> int | None:
    """N for a committed ``step_N`` checkpoint folder (any number of digits), None for anything else (scratch)."""
    m = _STEP_DIR.match(Path(folder).name)
    return int(m.group(1)) if m else None


def step_checkpoints(run_dir: str | os.PathLike, complete) -> list[Path]:
    """The committed ``checkpoints/step_N`` folders of a run that ``complete(folder)`` accepts (each trainer
    knows what its complete checkpoint holds), oldest step first. The one reader of that naming, for
    pre-training runs without Ray and fine-tuning runs alike."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and complete(p)]
    return sorted(found, key=step_of)


def checkpoint_scratch_name(step: int) -> str:
    """``checkpoints/step_000000042.tmp``: where the ranks write a save before rank 0 commits it."""
    return checkpoint_name(step) + SCRATCH_SUFFIX


def fault_marker(action: str, rank: int, step: int) -> str:
    """``.fault-fired-ACTION-RANK-STEP``: a failure drill fires once per run, also across restarts."""
    return f".fault-fired-{action}-{int(rank)}-{int(step)}"


def worker_record(rank: int) -> str:
    """``workers/rank-N.json``: host, pid, Ray node and world size of worker ``rank``."""
    return f"{WORKERS_DIR}/rank-{int(rank)}.json"


def worker_log(rank: int) -> str:
    """``logs/rank-N.log``: everything worker ``rank`` printed (stdout and stderr), appended attempt after attempt."""
    return f"{LOGS_DIR}/rank-{int(rank)}.log"


def targets_file(rank: int) -> str:
    """``prometheus_targets/rank-N.json``: the file_sd entry of worker ``rank``'s /metrics."""
    return f"{TARGETS_DIR}/rank-{int(rank)}.json"


def targets_glob(run_dir: str | os.PathLike) -> Path:
    """The file_sd pattern a Prometheus watches for every rank of a run (Prometheus globs the last part)."""
    return Path(run_dir) / TARGETS_DIR / "*.json"


def rank_of(name: str) -> int | None:
    """N for ``rank-N.json`` (a worker record or a targets file), else None."""
    m = _RANK_FILE.match(Path(name).name)
    return int(m.group(1)) if m else None


def check_name(name: str, allowed: tuple[str, ...] = WORKER_WRITABLE) -> str:
    """``name`` if it is a relative path of plain parts under one of ``allowed``; else ValueError naming it."""
    parts = str(name).split("/")
    if (not name or os.path.isabs(name) or "\\" in name or any(p in ("", ".", "..") for p in parts)
            or not all(_PART.match(p) for p in parts) or parts[0] not in allowed):
        raise ValueError(f"{name!r}: not a run-folder name a worker may write (one of {', '.join(allowed)})")
    return name


class RunFiles:
    """Reads and writes of named files in one run folder (on this machine). Writes are atomic (a temporary file
    renamed over the name); appends go after the last whole line."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)

    def path(self, name: str) -> Path:
        return self.run_dir / check_name(name)

    def read_text(self, name: str) -> str | None:
        try:
            return self.path(name).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_text(self, name: str, text: str) -> None:
        from mim_scale.fileutil import write_atomic

        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)

    def write_bytes(self, name: str, data: bytes) -> None:
        from mim_scale.fileutil import write_atomic

        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def append_line(self, name: str, line: str) -> None:
        """Append one line (a newline is added); a line torn by a writer killed mid-append is cut first."""
        if "\n" in line:
            raise ValueError(f"{name}: one line at a time")
        self.truncate_torn_tail(name)
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    def truncate_torn_tail(self, name: str) -> None:
        from mim_scale.fileutil import truncate_torn_tail

        path = self.path(name)
        if path.is_file():
            truncate_torn_tail(path)

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def names(self, folder: str) -> list[str]:
        """The files directly under ``folder`` (``workers``, ``prometheus_targets``), as run-folder names."""
        base = self.path(folder)
        return sorted(f"{folder}/{p.name}" for p in base.glob("*") if p.is_file()) if base.is_dir() else []
