"""One live launch per run: ``RUN/lease.json``, held by the driver and kept fresh by a heartbeat.

Two drivers started with the same ``--name`` and ``--storage`` would both resume from one checkpoint and
interleave their writes. So ``mim-scale pretrain`` takes the run's lease before Ray starts:

    lease.json   {"host", "pid", "started", "heartbeat", "token"}: who holds the run, since when, last sign of life

The holder rewrites ``heartbeat`` every ``HEARTBEAT_SECONDS``. A second launch is refused, naming the holder
(host, pid, start time, seconds since its heartbeat), as soon as it sees the heartbeat move. The lease is
stale, and the new launch takes it over, when its heartbeat is older than ``STALE_SECONDS`` (a launch that
finds a fresh lease whose heartbeat stops moving waits until then), or at once when the holder ran on this
host and its pid is gone: so the documented re-run after a dead driver (laptop closed, pod evicted)
resumes, at most ``STALE_SECONDS`` later. The driver removes the lease when it ends.

The folder may be an object-store URI (the run folder under ``--storage``); there is no atomic
create-if-absent there, so a take-over is written, then re-read after a short pause: of two launches
racing for a free lease the one whose token is not read back gives up. Heartbeats compare wall clocks of
different hosts: keep them NTP-synchronised (``STALE_SECONDS`` is far above usual skew).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mim_scale.errors import UserFacingError
from mim_scale.launcher import runs

log = logging.getLogger("mim_scale.launcher")

LEASE_FILE = "lease.json"
HEARTBEAT_SECONDS = float(os.environ.get("MIM_SCALE_LEASE_HEARTBEAT_SECONDS", "10"))
STALE_SECONDS = float(os.environ.get("MIM_SCALE_LEASE_STALE_SECONDS", "60"))
SETTLE_SECONDS = 0.5  # pause between writing a take-over and reading it back


class RunLeaseHeld(UserFacingError):
    """Another live launch holds the run."""


def _describe(holder: dict[str, Any], now: float) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    beat = holder.get("heartbeat")
    age = f"{now - beat:.0f} s ago" if isinstance(beat, (int, float)) else "never"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {when}, last heartbeat {age}"


def lease_state(holder: dict[str, Any] | None, *, now: float | None = None,
                stale_seconds: float = STALE_SECONDS) -> str:
    """``free`` (no lease or unreadable), ``live`` or ``stale`` (see the module doc)."""
    if not holder:
        return "free"
    now = time.time() if now is None else now
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)) or now - beat > stale_seconds:
        return "stale"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not runs._pid_alive(holder["pid"]):
        return "stale"
    return "live"


@dataclass
class RunLease:
    """The lease of one run folder (local path or URI). Use :meth:`acquire`, then :meth:`release`."""

    folder: str
    token: str
    record: dict[str, Any]
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return runs._join(self.folder, LEASE_FILE)

    @classmethod
    def acquire(cls, folder: str, *, stale_seconds: float = STALE_SECONDS, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                settle_seconds: float = SETTLE_SECONDS, wait: bool = True) -> "RunLease":
        """Take the run's lease and start its heartbeat, or raise :class:`RunLeaseHeld` naming the holder.

        ``wait``: when the lease looks live, watch its heartbeat (the holder's interval is assumed to be
        ``heartbeat_seconds``): refused as soon as it moves, taken over once it is ``stale_seconds`` old. So a
        driver resubmitted after its predecessor died (KubeRay's ``backoffLimit``) waits, at most
        ``stale_seconds``, then resumes; a second launch beside a live one is refused within a heartbeat."""
        path = runs._join(folder, LEASE_FILE)
        holder = runs._read_json(path)
        now = time.time()
        state = lease_state(holder, now=now, stale_seconds=stale_seconds)
        # A live-looking lease whose holder may be dead (another host: its pid cannot be checked): watch the
        # heartbeat. It moves within one interval if the holder lives (refused then); it goes stale if not.
        first_beat = holder.get("heartbeat") if holder else None
        while state == "live" and wait:
            time.sleep(min(1.0, heartbeat_seconds / 4))
            holder = runs._read_json(path)
            now = time.time()
            state = lease_state(holder, now=now, stale_seconds=stale_seconds)
            if state == "live" and holder.get("heartbeat") != first_beat:
                break  # it beat again: alive
        if state == "live":
            raise RunLeaseHeld(
                f"{folder}: run already held by a live launch ({_describe(holder, now)}). Two launches of one run "
                f"would resume from the same checkpoint and interleave their writes. Stop that one "
                f"(`mim-scale stop`), or if it is dead, re-run in {stale_seconds:.0f} s (its lease goes stale) or "
                f"delete {path}")
        if state == "stale":
            log.warning("%s: taking over a stale lease (%s)", folder, _describe(holder, now))
        token = uuid.uuid4().hex
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now, "token": token}
        runs.write_text(path, json.dumps(record))
        if settle_seconds > 0:
            time.sleep(settle_seconds)
        back = runs._read_json(path) or {}
        if back.get("token") != token:
            raise RunLeaseHeld(f"{folder}: another launch took the run at the same moment "
                               f"({_describe(back, time.time())})")
        lease = cls(folder=folder, token=token, record=record, heartbeat_seconds=heartbeat_seconds)
        lease._start()
        return lease

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="mim-run-lease")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the lease only goes stale later
                log.warning("%s: lease heartbeat failed (%s)", self.folder, exc)

    def heartbeat(self) -> bool:
        """Refresh the heartbeat; False (and a logged error) when another launch took the lease meanwhile."""
        current = runs._read_json(self.path)
        if current is not None and current.get("token") != self.token:
            log.error("%s: the run's lease was taken over by another launch (%s): this launch's writes may mix "
                      "with it", self.folder, _describe(current, time.time()))
            return False
        self.record["heartbeat"] = time.time()
        runs.write_text(self.path, json.dumps(self.record))
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        current = runs._read_json(self.path)
        if current is not None and current.get("token") == self.token:
            runs.delete(self.path)
