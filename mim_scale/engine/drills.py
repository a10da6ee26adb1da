"""Failure drills: a fault injected at a chosen rank and step, so restarts and resumes are exercised for real
(``--fault raise:RANK:STEP`` / ``kill:RANK:STEP``; the launcher's checkpoint-write drills parse the same form)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from mim_scale.rundir import fault_marker

log = logging.getLogger("mim_scale.train")

Drill = tuple[str, int, int]  # (action, rank, step)


def parse_drill(spec: str | None, actions: tuple[str, ...], what: str = "fault") -> Drill | None:
    """A failure drill ``"ACTION:RANK:STEP"`` with ACTION one of ``actions`` -> (action, rank, step)."""
    if not spec:
        return None
    try:
        action, rank, step = spec.split(":")
        if action not in actions:
            raise ValueError(action)
        return action, int(rank), int(step)
    except ValueError as exc:
        forms = " or ".join(f"{a}:RANK:STEP" for a in actions)
        raise ValueError(f"{what} {spec!r} must look like {forms}") from exc


def parse_fault(spec: str | None) -> Drill | None:
    """A fault to inject, for failure drills: ``"raise:RANK:STEP"`` or ``"kill:RANK:STEP"``.

    The fault fires once per run, when that rank starts that step: ``raise`` raises an exception,
    ``kill`` SIGKILLs the worker process.
    """
    return parse_drill(spec, ("raise", "kill"), "fault spec")


def inject_fault(fault: Drill | None, rank: int, step: int, restarts: int, run_dir: Path) -> None:
    """Fire ``fault`` if this is its rank and step, once per run (a marker file in the run folder remembers it,
    also when it fires before the first checkpoint, so the restart count stays 0)."""
    if fault is None or restarts > 0 or (fault[1], fault[2]) != (rank, step):
        return
    marker = Path(run_dir) / fault_marker(fault[0], rank, step)
    if marker.exists():
        return
    marker.touch()
    log.warning("rank %d: injecting fault %r at step %d", rank, fault[0], step)
    if fault[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault on rank {rank} at step {step}")
