"""A run's folder as operators see it: ``mim-scale status RUN`` and ``mim-scale stop RUN``.

A run folder (``STORAGE/NAME``) holds what Ray Train persists (``checkpoint_*/`` and
``checkpoint_manager_snapshot.json``, the list of checkpoints that were committed) and what the launcher
and the workers add beside it::

    launcher.json              the driver: state (running/finished/stopped/failed), host, pid, Ray address
    workers/rank-N.json        each worker of the current group: host, pid, Ray node, world size
    prometheus_targets/*.json  each worker's /metrics address (Prometheus file_sd)
    history.jsonl              one line per logged step (rank 0)
    STOP                       a stop request, written by ``mim-scale stop``; removed when the run starts

A stop request is honoured at a step boundary: every rank polls for ``STOP``, the ranks agree on it in
their per-step all-reduce, save a checkpoint and end; the run then reads ``stopped``. Re-running the same
``mim-scale pretrain`` command resumes from that checkpoint.

Paths may be local folders or object-store URIs (``s3://``, ``gs://``; whatever ``pyarrow.fs`` reads).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from mim_scale import rundir
from mim_scale.rundir import DRIVER_FILE, SNAPSHOT_FILE, STOP_FILE  # noqa: F401 - the names other modules import here


# ------------------------------------------------------------------ paths that may be URIs

def _fs(path: str):
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def path_exists(path: str | Path) -> bool:
    path = str(path)
    if "://" not in path:
        return os.path.exists(path)
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_text(path: str | Path) -> str | None:
    path = str(path)
    if "://" not in path:
        try:
            return Path(path).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
    if not path_exists(path):
        return None
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str | Path, text: str) -> None:
    path = str(path)
    if "://" not in path:
        from mim_scale.fileutil import write_atomic

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), text)
        return
    fs, p = _fs(path)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def delete(path: str | Path) -> None:
    path = str(path)
    if "://" not in path:
        Path(path).unlink(missing_ok=True)
    elif path_exists(path):
        fs, p = _fs(path)
        fs.delete_file(p)


def _join(folder: str | Path, name: str) -> str:
    folder = str(folder)
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else str(Path(folder) / name)


def _read_json(path: str) -> Any:
    text = read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None  # a file being replaced; the caller treats it as absent


# ------------------------------------------------------------------ the driver's record, stop requests

class DriverRecord:
    """``RUN/launcher.json``: written by the driver when it starts and when it ends."""

    def __init__(self, run_dir: Path, *, name: str, storage: str, address: str):
        self.path = Path(run_dir) / DRIVER_FILE
        self.base = {"run": name, "storage": storage, "address": address, "host": socket.gethostname(),
                     "pid": os.getpid(), "started": time.time()}
        previous = _read_json(str(self.path)) or {}
        self.base["launches"] = int(previous.get("launches", 0)) + 1

    def write(self, state: str, **fields: Any) -> None:
        record = {**self.base, **{k: v for k, v in fields.items() if v is not None}, "state": state,
                  "updated": time.time()}
        write_text(self.path, json.dumps(record, indent=1))
        self.base.update({k: v for k, v in fields.items() if v is not None and k == "ray_address"})


def _stop_paths(run_dir: Path, stop_uri: str | None) -> list[str]:
    return [str(Path(run_dir) / STOP_FILE)] + ([_join(stop_uri, STOP_FILE)] if stop_uri else [])


def clear_stop_request(run_dir: Path, stop_uri: str | None = None) -> None:
    for p in _stop_paths(run_dir, stop_uri):
        delete(p)


def stop_was_requested(run_dir: Path, stop_uri: str | None = None) -> bool:
    return any(path_exists(p) for p in _stop_paths(run_dir, stop_uri))


# ------------------------------------------------------------------ status

def resolve_run(run: str, storage: str | None = None) -> str:
    """The run folder named by ``run``: a folder or URI as given, else ``STORAGE/run``."""
    from mim_scale.errors import UserFacingError

    if "://" in run:
        return run.rstrip("/")
    if Path(run).is_dir():
        return str(Path(run).resolve())
    root = storage or "runs"
    candidate = _join(root, run) if "://" in root else str(Path(root).resolve() / run)
    if path_exists(candidate):
        return candidate
    known = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if "://" not in root and Path(root).is_dir() else []
    raise UserFacingError(f"{run}: no such run folder (looked at {run} and {candidate})"
                          + (f"; runs in {root}: {', '.join(known)}" if known else ""))


def committed_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint Ray committed (listed in its snapshot); partial uploads are never listed.

    Runs written without Ray (``step_*`` folders) fall back to the newest complete checkpoint folder."""
    snapshot = _read_json(_join(run_dir, SNAPSHOT_FILE))
    if snapshot and snapshot.get("latest_checkpoint_result"):
        return _join(run_dir, snapshot["latest_checkpoint_result"]["checkpoint_dir_name"])
    if "://" in run_dir:
        return None
    from mim_scale.engine.checkpoint import find_checkpoints

    found = find_checkpoints(Path(run_dir))
    return str(found[-1]) if found else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _probe(target: str, timeout: float = 1.0) -> dict[str, float] | None:
    """Scrape a worker's /metrics; the ``mim_step`` and ``mim_restarts_total`` values, or None if down."""
    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=timeout) as r:  # noqa: S310 - http only
            text = r.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("mim_step", "mim_restarts_total") and not line.startswith("#"):
            try:
                found[name] = float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return found


def _last_logged_step(run_dir: str) -> dict[str, Any] | None:
    """The last complete line of ``history.jsonl`` (a torn last line is skipped), None without one."""
    history = read_text(_join(run_dir, rundir.HISTORY_FILE))
    if history:
        for line in reversed(history.splitlines()):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # the line rank 0 is appending right now
    return None


def _checkpoint_status(run_dir: str) -> tuple[dict[str, Any] | None, Any]:
    """The committed checkpoint -> ({path, step, samples_seen, world_size}, restarts from its state), or (None, None)."""
    from mim_scale.engine.checkpoint import STATE_FILE

    ckpt = committed_checkpoint(run_dir)
    if ckpt is None:
        return None, None
    state = _read_json(_join(ckpt, STATE_FILE)) or {}
    return ({"path": ckpt, "step": state.get("step"), "samples_seen": state.get("samples_seen"),
             "world_size": state.get("world_size")}, state.get("restarts"))


def _worker_status(run_dir: str, probe: bool) -> tuple[list[dict[str, Any]], list[int]]:
    """Each ``workers/rank-N.json`` in rank order -> (its record with its /metrics target and, when ``probe``,
    whether that answered and its step; the ``mim_restarts_total`` each answering worker reported).
    Local run folders only: an object-store run lists no workers."""
    workers: list[dict[str, Any]] = []
    restarts: list[int] = []
    if "://" in run_dir:
        return workers, restarts
    records = [p for p in Path(run_dir, rundir.WORKERS_DIR).glob("rank-*.json") if rundir.rank_of(p.name) is not None]
    for record in sorted(records, key=lambda p: rundir.rank_of(p.name)):
        w = _read_json(str(record)) or {}
        target_file = _read_json(str(Path(run_dir, rundir.targets_file(rundir.rank_of(record.name))))) or []
        targets = [t for group in target_file for t in group.get("targets", [])]
        w = {k: w.get(k) for k in ("rank", "host", "pid", "node_id", "world_size")}
        w["metrics"] = targets[0] if targets else None
        if probe and targets:
            seen = _probe(targets[0])
            w["reachable"] = seen is not None
            if seen:
                w["step"] = seen.get("mim_step")
                if seen.get("mim_restarts_total") is not None:
                    restarts.append(int(seen["mim_restarts_total"]))
        workers.append(w)
    return workers, restarts


def _driver_alive(state: str, driver: dict[str, Any], workers: list[dict[str, Any]]) -> bool | None:
    """Is the driver of a ``running`` run alive? Its pid on this host, else any worker answering; None when
    the driver runs elsewhere and no worker answered (cannot tell from here). False for any other state."""
    if state != "running":
        return False
    if driver.get("host") == socket.gethostname() and driver.get("pid"):
        return _pid_alive(int(driver["pid"]))
    if any(w.get("reachable") for w in workers):
        return True
    return None


def run_status(run_dir: str, *, probe: bool = True) -> dict[str, Any]:
    """Everything ``mim-scale status`` prints, as a dict (see the module doc for where each comes from)."""
    status: dict[str, Any] = {"run": run_dir.rstrip("/").rsplit("/", 1)[-1], "folder": run_dir}
    driver = _read_json(_join(run_dir, DRIVER_FILE)) or {}
    status["state"] = driver.get("state", "unknown")
    status["driver"] = {k: driver.get(k) for k in ("host", "pid", "address", "ray_address", "launches", "error")
                        if driver.get(k) is not None}
    last = _last_logged_step(run_dir)
    status["step"] = last.get("step") if last else None
    status["samples_seen"] = last.get("samples_seen") if last else None
    status["loss"] = last.get("total") if last else None
    status["checkpoint"], status["restarts"] = _checkpoint_status(run_dir)
    workers, probed_restarts = _worker_status(run_dir, probe)
    for count in probed_restarts:
        status["restarts"] = max(status["restarts"] or 0, count)
    status["workers"] = workers
    alive = _driver_alive(status["state"], driver, workers)
    if status["state"] == "running" and alive is False:
        status["state"] = "driver lost"  # killed without writing its end state; re-run the command to resume
    status["alive"] = alive
    status["stop_requested"] = path_exists(_join(run_dir, STOP_FILE))
    return status


def format_status(s: dict[str, Any]) -> str:
    alive = {True: "yes", False: "no", None: "unknown"}[s["alive"]]
    lines = [f"run        {s['run']}  ({s['folder']})",
             f"state      {s['state']}, alive: {alive}" + ("  [stop requested]" if s["stop_requested"] else "")]
    if s["driver"]:
        d = s["driver"]
        lines.append(f"driver     {d.get('host')} pid {d.get('pid')}, Ray {d.get('ray_address') or d.get('address')}, "
                     f"launch #{d.get('launches')}" + (f", error: {d['error']}" if d.get("error") else ""))
    lines.append(f"step       {s['step']}  samples seen {s['samples_seen']}  loss {s['loss']}")
    c = s["checkpoint"]
    lines.append(f"checkpoint step {c['step']} ({c['samples_seen']} samples, {c['world_size']} workers) {c['path']}"
                 if c else "checkpoint none yet")
    lines.append(f"restarts   {s['restarts']}")
    for w in s["workers"]:
        up = {True: "up", False: "down", None: "-"}[w.get("reachable")]
        lines.append(f"worker {w['rank']}   {w['host']} pid {w['pid']}  metrics {w['metrics']} {up}"
                     + (f" step {int(w['step'])}" if w.get("step") is not None else ""))
    return "\n".join(lines)


def request_stop(run_dir: str, *, wait_seconds: float = 0.0, poll: float = 1.0) -> dict[str, Any]:
    """Write the stop request; with ``wait_seconds`` > 0, wait until the driver records the end."""
    record = {"requested": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
    write_text(_join(run_dir, STOP_FILE), json.dumps(record))
    deadline = time.monotonic() + wait_seconds
    status = run_status(run_dir, probe=False)
    while wait_seconds > 0 and status["state"] == "running" and time.monotonic() < deadline:
        time.sleep(poll)
        status = run_status(run_dir, probe=False)
    return status
