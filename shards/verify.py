"""``verify``: re-read every shard of a manifest, check its size and sha256, decode every sample."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mim_scale.shards.format import decode_sample, read_manifest
from mim_scale.shards.worker import content_hash
from mim_scale.fileutil import sha256_file


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def iter_shard_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard as WebDataset-style dicts: ``{"__key__": key, ext: bytes, ...}``."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name).name
            key, _, ext = name.partition(".")
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current


def verify_shards(path: str | Path, decode: bool = True) -> VerifyReport:
    """path: manifest.json or its folder. Checks every shard's bytes and sha256 against the manifest,
    that the sample count matches, and (``decode``) that every sample decodes to the shape and content
    hash its metadata records."""
    manifest = read_manifest(path)
    root = Path(manifest["root"])
    rep = VerifyReport()
    seen_keys: set[str] = set()
    for shard in manifest["shards"]:
        p = root / shard["url"]
        rep.shards += 1
        if not p.is_file():
            rep.errors.append(f"{shard['url']}: missing")
            continue
        size = p.stat().st_size
        rep.bytes += size
        if size != shard["bytes"]:
            rep.errors.append(f"{shard['url']}: {size} bytes, manifest says {shard['bytes']}")
            continue
        if sha256_file(p) != shard["sha256"]:
            rep.errors.append(f"{shard['url']}: sha256 mismatch")
            continue
        n = 0
        try:
            for sample in iter_shard_samples(p):
                n += 1
                key = sample["__key__"]
                if key in seen_keys:
                    rep.errors.append(f"{shard['url']}: key {key} appears twice in the set")
                seen_keys.add(key)
                if decode:
                    try:
                        vol, meta = decode_sample(sample)
                    except (ValueError, OSError, EOFError) as exc:
                        rep.errors.append(f"{shard['url']}/{key}: does not decode ({exc})")
                        continue
                    if meta.get("key") != key:
                        rep.errors.append(f"{shard['url']}/{key}: metadata key {meta.get('key')} differs")
                    if content_hash(vol) != meta.get("content_sha256"):
                        rep.errors.append(f"{shard['url']}/{key}: content hash differs from its metadata")
        except tarfile.TarError as exc:
            rep.errors.append(f"{shard['url']}: unreadable tar ({exc})")
            continue
        rep.samples += n
        if n != shard["samples"]:
            rep.errors.append(f"{shard['url']}: {n} samples, manifest says {shard['samples']}")
    if rep.samples != manifest.get("num_samples", rep.samples) and not rep.errors:
        rep.errors.append(f"{rep.samples} samples in shards, manifest says {manifest['num_samples']}")
    return rep
