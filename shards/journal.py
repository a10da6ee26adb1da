"""The build journal: the private, append-only record of how far a shard build got, so a re-run resumes.

``PRIVATE/journal.jsonl`` starts with a plan line ``{"plan": FINGERPRINT}`` (:func:`plan_fingerprint`: the
config, the planned items in order and the exclude list), then one checkpoint line per closed shard (and a
last one at the end of the plan)::

    {"next_item": N, "items": [record per item since the previous line], "shard": ShardInfo or null}

A re-run with the same fingerprint keeps the longest prefix whose lines parse and whose shards are still
on disk with the recorded size and sha256 (:func:`load_journal`), cuts the file back to it, and continues
at ``next_item`` (:class:`Journal`). Another fingerprint starts the journal anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mim_scale.fileutil import sha256_file
from mim_scale.shards.format import ShardInfo
from mim_scale.shards.writer import write_durable

log = logging.getLogger("mim_scale.shards")

JOURNAL_NAME = "journal.jsonl"


def plan_fingerprint(cfg: Any, items: list, exclude: set[str]) -> str:
    """sha256 of what decides the output: the build config (a dataclass), each planned item's key, kind, files
    and multiframe flag in plan order, and the exclude list."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it.key, it.kind, it.files, it.multiframe]).encode())
    h.update(json.dumps(sorted(exclude)).encode())
    return h.hexdigest()


@dataclass
class JournalState:
    """The valid prefix of a build journal. ``valid_bytes``: its length in bytes (0: no usable plan line);
    everything after it (a line torn by a kill, records after a shard that no longer matches) is dropped."""

    shards: list[ShardInfo]
    records: list[dict]
    next_item: int
    valid_bytes: int


def _journal_record(line: bytes, shards: list[ShardInfo], out: Path) -> dict | None:
    """One complete journal line -> its record, or None when it is not valid JSON of the expected form or its
    shard is not on disk with the recorded size and sha256."""
    try:
        rec = json.loads(line)
        items, next_item, shard = rec["items"], int(rec["next_item"]), rec.get("shard")
        if not isinstance(items, list):
            return None
        if shard is not None:
            info = ShardInfo(**shard)
            p = out / info.url
            if (info.index != len(shards) or Path(info.url).name != info.url or not p.is_file()
                    or p.stat().st_size != info.bytes or sha256_file(p) != info.sha256):
                return None
            rec["shard"] = info
        rec["next_item"] = next_item
        return rec
    except (ValueError, KeyError, TypeError):
        return None


def load_journal(path: Path, fingerprint: str, out: Path) -> JournalState:
    """Valid prefix of the journal: read to the last complete line whose record holds, never past it."""
    state = JournalState([], [], 0, 0)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return state
    end = data.find(b"\n")
    try:
        head = json.loads(data[:end]) if end >= 0 else None
    except ValueError:
        head = None
    if not isinstance(head, dict) or head.get("plan") != fingerprint:
        if head is not None:
            log.info("inputs or config changed since the last build: rebuilding from scratch")
        return state
    state.valid_bytes = pos = end + 1
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            break  # no more complete lines (a torn last line has no newline)
        rec = _journal_record(data[pos:end], state.shards, out)
        if rec is None:
            break
        if rec["shard"] is not None:
            state.shards.append(rec["shard"])
        state.records.extend(rec["items"])
        state.next_item = rec["next_item"]
        state.valid_bytes = pos = end + 1
    return state


class Journal:
    """The journal open for appending checkpoint lines, each fsynced before :meth:`checkpoint` returns.

    Opening cuts the file back to ``state``'s valid prefix first (so new lines follow the last good one instead
    of a torn one, where no later read would see them), or starts it anew with the plan line."""

    def __init__(self, path: Path, fingerprint: str, state: JournalState):
        if state.valid_bytes == 0:
            write_durable(path, (json.dumps({"plan": fingerprint}) + "\n").encode())
        elif path.stat().st_size != state.valid_bytes:
            log.info("journal: dropping %d byte(s) after the last valid record (a build was killed mid-write)",
                     path.stat().st_size - state.valid_bytes)
            with open(path, "r+b") as f:
                f.truncate(state.valid_bytes)
                f.flush()
                os.fsync(f.fileno())
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def checkpoint(self, next_item: int, items: list[dict], shard: ShardInfo | None) -> None:
        """Record ``items`` (plan order) as done, up to plan position ``next_item``, with the shard just closed."""
        rec = {"next_item": next_item, "items": items, "shard": dataclasses.asdict(shard) if shard else None}
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
