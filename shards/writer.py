"""Byte-deterministic tar shards, written under a temporary name and renamed when complete.

Members carry mtime 0, uid/gid 0, empty owner names and mode 0444, so the same samples in the same
order give the same bytes (and the same sha256) on every run and machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

from mim_scale.shards.format import ShardInfo

SHARD_PATTERN = "shard-{:06d}.tar"
TMP_SUFFIX = ".tmp"


def write_durable(path: Path, data: bytes) -> None:
    """A build's small file (journal head, salt, reports, manifest): atomic, fsynced, its rename fsynced, under
    the temporary name a next build sweeps (``*`` + TMP_SUFFIX)."""
    from mim_scale.fileutil import write_atomic

    write_atomic(path, data, tmp_path=path.with_name(path.name + TMP_SUFFIX), sync_dir=True)


def open_output(path: Path) -> BinaryIO:
    """Open a shard file for writing (the one place output is opened, so tests can inject ENOSPC)."""
    return open(path, "wb")  # noqa: SIM115 - closed by ShardFile


class _HashingWriter:
    """File wrapper that hashes and counts what is written."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return n

    def tell(self) -> int:
        return self.size


class ShardFile:
    """One shard being written: ``add`` samples, then ``finish`` (rename) or ``abort`` (delete)."""

    def __init__(self, out_dir: Path, index: int):
        self.index = index
        self.url = SHARD_PATTERN.format(index)
        self.final_path = out_dir / self.url
        self.tmp_path = out_dir / (self.url + TMP_SUFFIX)
        self._f = open_output(self.tmp_path)
        self._hw = _HashingWriter(self._f)
        self._tar = tarfile.open(fileobj=self._hw, mode="w|", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]
        self.samples = 0
        self.datasets: dict[str, int] = {}

    @property
    def bytes_written(self) -> int:
        return self._hw.size

    def add(self, key: str, members: list[tuple[str, bytes]], dataset: str) -> None:
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.datasets[dataset] = self.datasets.get(dataset, 0) + 1

    def finish(self) -> ShardInfo:
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.final_path)
        return ShardInfo(url=self.url, samples=self.samples, datasets=dict(sorted(self.datasets.items())),
                         sha256=self._hw.sha.hexdigest(), bytes=self._hw.size, index=self.index)

    def abort(self) -> None:
        # a stream-mode tar flushes its buffer when collected: mark it closed so nothing more is written
        self._tar.closed = True
        stream = getattr(self._tar, "fileobj", None)
        if stream is not None and hasattr(stream, "closed"):
            stream.closed = True
        try:
            self._f.close()
        except OSError:
            pass
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass
