"""Prometheus ``file_sd`` files: how one Prometheus finds every worker of a run (one file per rank in the
run folder, :mod:`mim_scale.rundir`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from mim_scale.fileutil import write_atomic

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TARGET = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def write_file_sd(path: str | os.PathLike, targets: Iterable[str], labels: Mapping[str, str] | None = None) -> Path:
    """Atomically write a Prometheus ``file_sd`` JSON file with one target group.

    targets: ``"host:port"`` strings; labels: extra target labels (e.g. ``{"run": "r1"}``).
    """
    return write_file_sd_groups(path, [{"targets": list(targets), "labels": dict(labels or {})}])


def write_file_sd_groups(path: str | os.PathLike, groups: Iterable[Mapping]) -> Path:
    """Atomically write several ``{"targets": [...], "labels": {...}}`` groups to ``path``.

    Prometheus re-reads the file on change; writing a temporary file in the same folder and renaming it
    over ``path`` means it never reads a half-written file.
    """
    path = Path(path)
    text = file_sd_text(groups, where=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path


def file_sd_text(groups: Iterable[Mapping], where: str = "file_sd") -> str:
    """The JSON text of a file_sd file holding ``groups`` (checked: host:port targets, valid label names); what
    a worker sends to the driver's run folder (:mod:`mim_scale.rundir`)."""
    path = where
    doc = []
    for i, group in enumerate(groups):
        targets = [str(t) for t in group.get("targets", [])]
        for t in targets:
            if not _TARGET.match(t) or not 0 < int(t.rsplit(":", 1)[1]) <= 65535:
                raise ValueError(f"{path}: group {i}: target {t!r} is not host:port")
        labels = {str(k): str(v) for k, v in dict(group.get("labels", {})).items()}
        for k in labels:
            if not _LABEL_NAME.match(k) or k.startswith("__"):
                raise ValueError(f"{path}: group {i}: {k!r} is not a valid target label name")
        doc.append({"targets": targets, "labels": labels})
    return json.dumps(doc, indent=2) + "\n"


def read_file_sd(path: str | os.PathLike) -> list[dict]:
    """Read a ``file_sd`` JSON file; raises ``ValueError`` naming the file when it is malformed."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, list) or not all(isinstance(g, dict) and "targets" in g for g in doc):
        raise ValueError(f"{path}: a file_sd file is a JSON list of {{'targets': [...], 'labels': {{...}}}}")
    return doc

