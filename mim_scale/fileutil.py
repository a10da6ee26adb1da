"""Small file helpers shared by the stages: content hashes, atomic writes, append-only JSON lines and bounded
JSON reads."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike, *, tmp_path: str | os.PathLike | None = None,
                sync_dir: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (``savefig``, ``nib.save``,
    safetensors' ``save_file``): renamed over ``path`` when the block ends, removed when it raises, so no
    half-written file ever has the final name. ``tmp_path``: the temporary name (default
    ``.NAME.tmpPID`` beside it; a builder that sweeps its own leftovers names its own). ``sync_dir``: fsync
    the folder after the rename, so that the rename itself survives a power loss."""
    path = Path(path)
    tmp = Path(tmp_path) if tmp_path is not None else path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:  # a full disk or a signal: the old file stays, no temporary is left beside it
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, tmp_path: str | os.PathLike | None = None,
                 sync_dir: bool = False) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` through a temporary file, fsync and rename: no half-written
    file survives. ``tmp_path`` and ``sync_dir`` as for :func:`atomic_path`."""
    with atomic_path(path, tmp_path=tmp_path, sync_dir=sync_dir) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that renames and new entries in it survive a power loss (call after os.replace)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- append-only JSON-lines files (history, journal)
# A writer killed mid-append leaves a last line without its newline. Readers stop at the last complete line;
# a writer truncates the file there before appending, so its first record never glues onto the torn one.


def complete_prefix_bytes(path: str | os.PathLike) -> int:
    """Length in bytes of ``path`` up to and including its last newline (0 if it has none or is absent)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            while pos > 0:
                step = min(1 << 16, pos)
                f.seek(pos - step)
                block = f.read(step)
                i = block.rfind(b"\n")
                if i >= 0:
                    return pos - step + i + 1
                pos -= step
    except FileNotFoundError:
        return 0
    return 0


def truncate_torn_tail(path: str | os.PathLike) -> int:
    """Cut an append-only file back to its last complete line before appending to it; returns the bytes
    removed (0 when the file is whole or absent). The truncation is fsynced."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    keep = complete_prefix_bytes(path)
    if keep == size:
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of an append-only JSON-lines file, read to its last complete line (a torn last line,
    being written or left by a killed writer, is not returned). A complete line that is not a JSON object
    (an old torn line that a later append completed) is skipped with a warning naming the file and line."""
    import json
    import logging

    keep = complete_prefix_bytes(path)
    if keep == 0:
        return []
    with open(path, "rb") as f:
        data = f.read(keep)
    records = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").split("\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            logging.getLogger(__name__).warning("%s: line %d is not a JSON object; skipped", path, number)
            continue
        records.append(record)
    return records


# ---------------------------------------------------------------- small JSON files from elsewhere


class JSONFileError(ValueError):
    """A JSON file that is too large or not JSON; the message gives the reason only, the caller names the file
    (and raises its own error type)."""


def read_json_bounded(path: str | os.PathLike, limit_bytes: int, what: str) -> Any:
    """The JSON value in ``path``, refused unread when larger than ``limit_bytes`` (``what`` names what the
    file should be, for that message: "not an export's config"). Raises :class:`JSONFileError`."""
    import json

    path = Path(path)
    if path.stat().st_size > limit_bytes:
        raise JSONFileError(f"larger than {limit_bytes} bytes, {what}")
    with open(path, "rb") as f:
        data = f.read(limit_bytes + 1)  # the file may have grown since the stat
    if len(data) > limit_bytes:
        raise JSONFileError(f"larger than {limit_bytes} bytes, {what}")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise JSONFileError(f"not JSON ({exc})") from exc
