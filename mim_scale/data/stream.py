"""Streaming random crops from WebDataset shards, with no cache and an exactly reproducible order.

Order. The stream is a pure function of (seed, worker layout, samples consumed):

- An infinite sequence of *shard picks*, pick ``i`` drawn with probability proportional to the shard's
  mixture weight from an RNG seeded by ``(seed, i)`` (resampled shards: no epochs, no exhaustion).
- The picks are dealt round-robin to ``S = world_size x loader_workers`` streams: stream
  ``s = rank x loader_workers + worker`` reads picks ``s, s + S, s + 2S, ...``.
- A pick reads its shard front to back (shuffled choice of shards happens *before* any decode), decodes a
  window of ``shuffle_buffer`` volumes at a time, and emits ``crops_per_volume`` crops of each, in an order
  and at offsets drawn from an RNG seeded by ``(seed, i, window)``.
- A PyTorch DataLoader deals batches from its ``K`` workers in turn, so after ``b`` batches on a rank,
  (logical) worker ``w`` has produced exactly ``ceil((b - w) / K)`` of them. Resuming skips that many samples per stream:
  whole picks by the manifest's counts (nothing read), then the members of one shard (read, not decoded).

A corrupt sample or shard is skipped, logged with its shard name and counted (``corrupt`` in the sample's
metadata is the worker's running count), and the stream goes on. (A corrupt sample upsets exact resume
only by the samples it would have produced.)

Batch contract. A sample of :class:`CropStream`: ``crop``: int16 (1, S, S, S) HU, air (``AIR_HU``) where
the volume is smaller than the crop; ``meta``: dict. A batch of :func:`make_loader`: ``crop``: int16
(B, 1, S, S, S) HU, ``meta``: list of B dicts. The HU window is *not* applied here: whoever moves a batch
to its device applies :func:`mim_scale.data.window.hu_window` there (``data.hu_min``/``hu_max`` -> float32
in [0, 1], bit-identical to the float32 window the loaders used to compute), so the loader workers, the
pinned buffer and the host-to-device copy move 2 bytes a voxel instead of 4. A batch is cropped straight
from the volume (an ``np.memmap`` of the shard for local ``.npy`` members) into its own buffer, allocated in
shared memory in a loader worker: no copy between the memory map and the batch that reaches the main
process (the pin-memory thread then copies it once into pinned memory on a CUDA machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mim_scale.config import DataConfig
from mim_scale.errors import UserFacingError
# the manifest's shard entry (sha256 checked where a shard is read whole, see CropStream._members; bytes bound
# that read) and the sample decoder are the shard format's
from mim_scale.shards.format import ShardInfo, decode_sample

log = logging.getLogger(__name__)

AIR_HU = -1000


# A shard URL in a manifest: a relative name inside the manifest's folder or S3 prefix, path segments of
# letters, digits and ``._-`` (what the builder writes: ``shard-000000.tar``). No scheme, no ``:``, no
# shell metacharacter, nothing absolute, no ``..``.
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
ALLOW_EXTERNAL_KEY = "data.allow_external_shard_urls"


def check_shard_url(url: Any, *, index: int, where: str, base: str, allow_external: bool) -> str:
    """The URL to read for manifest entry ``index`` (``url`` as written there), or a
    :class:`UserFacingError` naming the manifest, the entry and the reason.

    Accepted: a relative name inside the manifest's folder (``shard-000000.tar``, ``part1/shard-0.tar``;
    on a local disk it must also resolve, symlinks followed, inside that folder) or its S3 prefix, or an
    ``s3://`` URL under the same prefix as the manifest. Anything else (``pipe:`` URLs, which WebDataset
    runs through a shell; absolute paths; ``..``; other schemes) only with ``allow_external``
    (``data.allow_external_shard_urls = true``), for manifests the operator wrote or trusts.
    """
    if not isinstance(url, str) or not url:
        raise UserFacingError(f"{where}: shard entry {index} has no usable 'url' ({url!r})")
    if allow_external:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_absolute():
            return f"{base}/{url}"
        return url
    refuse = f"{where}: shard entry {index} url {url!r} refused: "
    hint = (f"; a shard must be a relative name inside the manifest's folder or prefix (set "
            f"{ALLOW_EXTERNAL_KEY}=true only for a manifest you wrote or trust)")
    base_is_s3 = base.startswith("s3://")
    if url.startswith("s3://"):
        if not base_is_s3:
            raise UserFacingError(refuse + "an s3:// URL in a manifest that is not in that bucket" + hint)
        prefix = base.rstrip("/") + "/"
        if not url.startswith(prefix):
            raise UserFacingError(refuse + f"outside the manifest's prefix {prefix}" + hint)
        rel = url[len(prefix):]
    else:
        rel = url
    if url.startswith("pipe:"):
        raise UserFacingError(refuse + "a pipe: URL runs a shell command" + hint)
    if "://" in rel or rel.startswith("/") or ":" in rel:
        raise UserFacingError(refuse + ("an absolute path" if rel.startswith("/") else "a URL scheme") + hint)
    segments = rel.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise UserFacingError(refuse + "empty, '.' or '..' path segments" + hint)
    bad = [seg for seg in segments if not _SAFE_SEGMENT.match(seg)]
    if bad:
        raise UserFacingError(refuse + f"characters outside [A-Za-z0-9._-] in {bad[0]!r}" + hint)
    if base_is_s3:
        return f"{base.rstrip('/')}/{rel}"
    folder = Path(base).resolve()
    target = (folder / rel).resolve()
    if not target.is_relative_to(folder):
        raise UserFacingError(refuse + f"it resolves to {target}, outside {folder} (a symbolic link?)" + hint)
    return f"{base}/{rel}"


def load_shard_list(location: str, *, allow_external: bool = False) -> list[ShardInfo]:
    """Shards of a manifest; URLs checked (:func:`check_shard_url`) and resolved against it.

    ``location``: a manifest.json path or the folder holding it, or ``s3://bucket/prefix/manifest.json``
    (or ``s3://bucket/prefix/``, read with boto3). Shard URLs are relative names inside the manifest's
    folder or S3 prefix, or ``s3://`` URLs under that prefix; any entry outside that is refused, naming the
    entry, unless ``allow_external`` (config ``data.allow_external_shard_urls``; then absolute paths,
    ``s3://`` URLs elsewhere and any URL WebDataset opens, ``pipe:`` included, are read as written).
    ``s3://`` shards are read through ``pipe:python -m mim_scale.data.s3cat s3://...`` (see
    :mod:`mim_scale.data.s3cat`: the endpoint comes from ``AWS_ENDPOINT_URL``; the URL is shell-quoted).
    """
    from mim_scale.data import s3cat

    if location.startswith("pipe:"):
        raise UserFacingError(f"data.shards={location!r}: a manifest location cannot be a pipe: command")
    if location.startswith("s3://"):
        manifest_url = location if location.endswith(".json") else location.rstrip("/") + "/manifest.json"
        try:
            text = s3cat.read_object(manifest_url).decode()
        except Exception as exc:  # noqa: BLE001 - any fetch failure is reported with the URL
            raise UserFacingError(f"{manifest_url}: cannot read the shard manifest ({type(exc).__name__}: {exc})") from exc
        where, base = manifest_url, manifest_url.rsplit("/", 1)[0]
    else:
        path = Path(location)
        manifest_path = path / "manifest.json" if path.is_dir() else path
        if not manifest_path.is_file():
            raise UserFacingError(f"{manifest_path}: no shard manifest there (build one with `mim-scale shards build`)")
        text, where, base = manifest_path.read_text(), str(manifest_path), str(manifest_path.parent)
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserFacingError(f"{where}: not a valid manifest ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", []), list):
        raise UserFacingError(f"{where}: not a valid manifest (expected an object with a 'shards' list)")
    shards = []
    for i, entry in enumerate(manifest.get("shards", [])):
        if not isinstance(entry, dict):
            raise UserFacingError(f"{where}: shard entry {i} is not an object")
        url = check_shard_url(entry.get("url"), index=i, where=where, base=base, allow_external=allow_external)
        if url.startswith("s3://"):
            url = s3cat.pipe_url(url)
        try:
            samples = int(entry["samples"])
            datasets = {str(k): int(v) for k, v in
                        (entry.get("datasets") or {manifest.get("dataset", "default"): samples}).items()}
            sha = str(entry.get("sha256") or "")
            size = int(entry.get("bytes") or 0)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserFacingError(f"{where}: shard entry {i} ({entry.get('url')!r}): bad samples/datasets/"
                                  f"sha256/bytes ({type(exc).__name__}: {exc})") from exc
        if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise UserFacingError(f"{where}: shard entry {i} ({entry.get('url')!r}): sha256 is not 64 hex digits")
        shards.append(ShardInfo(url=url, samples=samples, datasets=datasets, sha256=sha, bytes=max(0, size)))
    shards = [s for s in shards if s.samples > 0]
    if not shards:
        raise UserFacingError(f"{where}: the manifest lists no non-empty shards")
    return shards


def manifest_shards(cfg: DataConfig) -> list[ShardInfo]:
    """:func:`load_shard_list` of ``cfg.shards`` under the config's URL policy (every reader of a run's
    shards goes through this, so the driver's check and the workers' reads agree)."""
    return load_shard_list(cfg.shards, allow_external=cfg.allow_external_shard_urls)


def shard_name(url: str) -> str:
    """The shard's file name, for logs and metrics (also for ``pipe:`` URLs)."""
    return url.rstrip("'\"").rsplit("/", 1)[-1]


def rewrite_urls(shards: list[ShardInfo], prefix_from: str, prefix_to: str) -> list[ShardInfo]:
    """Point shard URLs elsewhere (for example local paths -> ``pipe:aws s3 cp s3://bucket/... -``)."""
    return [dataclasses.replace(s, url=prefix_to + s.url[len(prefix_from):]) if s.url.startswith(prefix_from) else s
            for s in shards]


def shard_weights(shards: list[ShardInfo], mixture: dict[str, float]) -> list[float]:
    """Pick probability of each shard, so that each dataset gets its mixture share of samples.

    With no mixture every volume is equally likely. With one, dataset ``d`` gets weight ``w_d`` spread over
    its volumes, so a small collection is neither drowned nor repeated in proportion to a large one.
    """
    totals: dict[str, int] = {}
    for s in shards:
        for name, n in s.datasets.items():
            totals[name] = totals.get(name, 0) + n
    if not mixture:
        weights = [float(s.samples) for s in shards]
    else:
        unknown = sorted(set(mixture) - set(totals))
        if unknown:
            raise UserFacingError(f"data.mixture names datasets not in the shards: {', '.join(unknown)} "
                                  f"(the shards hold: {', '.join(sorted(totals))})")
        weights = [sum(mixture.get(name, 0.0) * n / totals[name] for name, n in s.datasets.items()) for s in shards]
    if sum(weights) <= 0:
        raise UserFacingError("data.mixture gives every shard zero weight")
    return weights


def _rng(*parts: int | str) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def crop_box(shape: tuple[int, ...], size: int,
             offsets: tuple[float, float, float]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Where a cubic crop at fractional ``offsets`` in [0, 1) reads and writes: ``(source, target)`` slices.

    The crop is placed in the volume air-padded (``AIR_HU``) to at least ``size`` per axis, ``p // 2`` voxels
    before and ``p - p // 2`` after (``p = size - n``), at start ``min(int(u * (n' - size + 1)), n' - size)``
    of each padded length ``n'``; ``volume[source]`` is the part of it inside the volume, to be written at
    ``crop[target]`` (the rest of the crop is air). No padded copy of the volume is made.
    """
    source, target = [], []
    for u, n in zip(offsets, shape):
        pad = max(0, size - n)
        start = min(int(u * (n + pad - size + 1)), n + pad - size) - pad // 2  # in volume coordinates
        lo, hi = max(0, start), min(n, start + size)
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    return tuple(source), tuple(target)


def crop_into(out: np.ndarray, volume: np.ndarray, offsets: tuple[float, float, float]) -> None:
    """Write the crop of ``volume`` at ``offsets`` (:func:`crop_box`) into ``out``, air where it is padded.

    out: int16 (S, S, S), written in place (for instance one slot of a batch buffer); volume: int16
    (D, H, W) HU, an ``np.memmap`` or an array: read once, straight into ``out``.
    """
    source, target = crop_box(volume.shape, out.shape[0], offsets)
    if any(t.stop - t.start < out.shape[0] for t in target):
        out.fill(AIR_HU)
    out[target] = volume[source]


def crop_hu(volume: np.ndarray, size: int, offsets: tuple[float, float, float]) -> torch.Tensor:
    """A cubic crop at fractional ``offsets`` in [0, 1), air-padded where the volume is smaller.

    volume: (D, H, W) int16 HU -> (1, size, size, size) int16 HU (window it with
    :func:`mim_scale.data.window.hu_window`).
    """
    out = torch.empty((1, size, size, size), dtype=torch.int16)
    crop_into(out.numpy()[0], volume, offsets)
    return out


class CropStream(IterableDataset):
    """Infinite stream of random crops for one training rank (see the module docstring for the order).

    Args:
        cfg: the ``data`` section of the config.
        shards: from :func:`load_shard_list`.
        rank, world_size: this rank's place among the data-parallel ranks.
        batch_size: the DataLoader's batch size (needed to place each loader worker on resume).
        batches_consumed: batches this rank already consumed (0 for a fresh start).
        seed: stream seed (defaults to ``cfg.seed``).
    """

    def __init__(self, cfg: DataConfig, shards: list[ShardInfo], *, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, batches_consumed: int = 0, seed: int | None = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1 or batches_consumed < 0:
            raise ValueError("batch_size must be >= 1 and batches_consumed >= 0")
        self.cfg = cfg
        self.shards = shards
        self.weights = shard_weights(shards, cfg.mixture)
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.batches_consumed = batches_consumed
        self.seed = cfg.seed if seed is None else seed

    # -- order -----------------------------------------------------------------------------------
    def pick(self, i: int) -> int:
        """Index of the shard read by pick ``i``."""
        return _rng(self.seed, "pick", i).choices(range(len(self.shards)), weights=self.weights)[0]

    def _stream_position(self) -> tuple[int, int, int, int]:
        """(stream id, number of streams, samples to skip, logical worker) of the calling loader worker.

        A fresh DataLoader always asks worker 0 first, so after ``b`` batches loader worker ``w`` plays
        logical worker ``(w + b) % K``: the one whose turn comes ``w``-th from now.
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        logical = (worker + self.batches_consumed) % workers
        stream = self.rank * workers + logical
        batches = max(0, math.ceil((self.batches_consumed - logical) / workers))
        return stream, self.world_size * workers, batches * self.batch_size, logical

    def __iter__(self) -> Iterator[dict]:
        """Samples ``{"crop": int16 (1, S, S, S) HU, "meta": dict}``, one new tensor each."""
        size = self.cfg.crop_size
        for volume, offsets, meta in self._crops():
            yield {"crop": crop_hu(volume, size, offsets), "meta": meta}

    def batches(self) -> Iterator[dict]:
        """Batches of ``batch_size`` consecutive samples, ``{"crop": int16 (B, 1, S, S, S) HU, "meta": [B
        dicts]}``: each crop is cut from its volume straight into its slot of the batch's buffer (in shared
        memory in a loader worker, so handing the batch to the main process copies nothing)."""
        size, count = self.cfg.crop_size, self.batch_size
        crops = self._crops()
        while True:
            buffer = _batch_buffer((count, 1, size, size, size))
            slots = buffer.numpy()
            metas = []
            for slot in range(count):
                volume, offsets, meta = next(crops)  # an infinite stream: never exhausted
                crop_into(slots[slot, 0], volume, offsets)  # now, while the volume is the generator's current one
                metas.append(meta)
            yield {"crop": buffer, "meta": metas}

    def _crops(self) -> Iterator[tuple[np.ndarray, tuple[float, float, float], dict]]:
        """The stream's crops, not yet cut: ``(volume (D, H, W) int16, offsets, meta)``; the consumer cuts
        each (:func:`crop_into`) before asking for the next."""
        stream, streams, skip, worker = self._stream_position()
        k = self.cfg.crops_per_volume
        corrupt = 0
        t = 0
        barren = 0  # consecutive picks that produced nothing readable
        while True:
            i = stream + streams * t
            t += 1
            shard = self.shards[self.pick(i)]
            produced = shard.samples * k
            if skip >= produced:  # skip a whole pick by the manifest's count: nothing is read
                skip -= produced
                continue
            produced_any = False
            for item in self._read_pick(i, shard, skip):
                if item is None:
                    corrupt += 1
                    continue
                produced_any = True
                volume, offsets, meta = item
                meta["corrupt"] = corrupt
                meta["worker"] = worker
                yield volume, offsets, meta
            skip = 0
            barren = 0 if produced_any else barren + 1
            if barren > 4 * len(self.shards) + 8:
                raise RuntimeError(f"no readable sample in the last {barren} shard reads (of {len(self.shards)} "
                                   f"shards, {corrupt} corrupt samples skipped): check the shards with "
                                   "`mim-scale shards verify`")

    def _read_pick(self, i: int, shard: ShardInfo,
                   skip: int = 0) -> Iterator[tuple[np.ndarray, tuple[float, float, float], dict] | None]:
        """Crops of one pick in their seeded order, not yet cut (``(volume, offsets, meta)``), the first
        ``skip`` left out without decoding; ``None`` marks a skipped corrupt sample."""
        k, window = self.cfg.crops_per_volume, self.cfg.shuffle_buffer
        members = self._members(shard)
        w = 0
        while True:
            raw = []
            for sample in members:
                raw.append(sample)
                if len(raw) == window:
                    break
            if not raw:
                return
            rng = _rng(self.seed, "window", i, w)
            w += 1
            order = [(j, c) for j in range(len(raw)) for c in range(k)]
            rng.shuffle(order)
            offsets = {(j, c): (rng.random(), rng.random(), rng.random()) for j, c in sorted(order)}
            decoded: dict[int, tuple[np.ndarray, dict] | None] = {}
            for j, c in order:
                if skip > 0:
                    skip -= 1
                    continue
                if j not in decoded:
                    decoded[j] = self._decode(raw[j], shard)
                if decoded[j] is None:
                    if c == 0:
                        yield None
                    continue
                volume, meta = decoded[j]
                yield volume, offsets[(j, c)], {"key": raw[j].get("__key__", ""), "shard": shard_name(shard.url),
                                                "dataset": meta.get("dataset", ""), "pick": i, "crop_index": c}
            raw.clear()

    def _members(self, shard: ShardInfo) -> Iterator[dict]:
        if _is_local(shard.url):
            yield from local_members(shard.url)
            return
        if shard.sha256:
            yield from verified_members(shard)
            return
        try:
            yield from wds.tarfile_samples([{"url": shard.url}], handler=wds.reraise_exception)
        except Exception as exc:  # noqa: BLE001 - any read failure of one shard must not stop training
            log.warning("skipping the rest of shard %s: %s", shard_name(shard.url), exc)
            yield {"__key__": "__corrupt__", "__error__": str(exc)}

    def _decode(self, sample: dict, shard: ShardInfo) -> tuple[np.ndarray, dict] | None:
        if "__error__" in sample:
            return None
        try:
            volume, meta = decode_sample(sample)
            if volume.ndim != 3 or volume.dtype != np.int16:
                raise ValueError(f"expected a 3-D int16 volume, got {volume.dtype} {volume.shape}")
            return volume, meta
        except Exception as exc:  # noqa: BLE001
            log.warning("skipping corrupt sample %s in shard %s: %s", sample.get("__key__"), shard_name(shard.url), exc)
            return None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and Path(url).is_file()


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split


def local_members(path: str) -> Iterator[dict]:
    """Samples of a local shard, grouped like ``webdataset.tarfile_samples``, without copying volumes.

    An uncompressed ``.npy`` member is returned as a read-only ``np.memmap`` into the tar file, so a
    crop reads only its own pages (from the page cache after the first read) instead of the whole volume;
    other members (``.npy.gz``, ``.json``) as bytes. A truncated or unreadable shard ends with a sample
    carrying ``__error__`` (skipped and counted by the stream).
    """
    current: dict[str, Any] | None = None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            size = os.fstat(f.fileno()).st_size
            for info in tar:
                if not info.isfile():
                    continue
                m = _MEMBER.match(info.name)
                if m is None:
                    continue
                key, ext = m.groups()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": path}
                if info.offset_data + info.size > size:
                    raise EOFError(f"member {info.name} runs past the end of the file")
                if ext == "npy":
                    f.seek(info.offset_data)
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"member {info.name}: .npy format version {version} not supported")
                    shape, fortran, dtype = read_header(f)  # a literal dict header: nothing unpickled
                    if dtype.hasobject:
                        raise ValueError(f"member {info.name}: object arrays are not allowed")
                    current[ext] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                             order="F" if fortran else "C")
                else:
                    f.seek(info.offset_data)
                    data = f.read(info.size)
                    if len(data) != info.size:
                        raise EOFError(f"member {info.name} is truncated")
                    current[ext] = data
    except Exception as exc:  # noqa: BLE001 - any read failure of one shard must not stop training
        log.warning("skipping the rest of shard %s: %s", shard_name(path), exc)
        yield {"__key__": "__corrupt__", "__error__": str(exc)}
        return
    if current is not None:
        yield current


class ShardIntegrityError(ValueError):
    """A shard's bytes differ from its manifest entry (size or sha256)."""


def verified_members(shard: ShardInfo, chunk_bytes: int = 1 << 20) -> Iterator[dict]:
    """Samples of a streamed shard (``pipe:``/``s3://``/http), read whole into a temporary file (deleted
    when done; at most the manifest's ``bytes``) and checked against the manifest's size and sha256
    *before* any member is parsed: a shard altered in the store or in transit is skipped and counted like
    a corrupt one, none of its samples reach training. Local shards are not read whole (crops read only
    their pages, see :func:`local_members`); ``mim-scale shards verify`` checks those."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(prefix="mim-shard-", suffix=".tar") as spool:
            digest, size = hashlib.sha256(), 0
            stream = wds.gopen(shard.url, "rb")
            try:
                while block := stream.read(chunk_bytes):
                    size += len(block)
                    if shard.bytes and size > shard.bytes:
                        raise ShardIntegrityError(f"more than the manifest's {shard.bytes} bytes")
                    digest.update(block)
                    spool.write(block)
            finally:
                stream.close()  # a pipe's exit status is checked here (non-zero raises)
            if shard.bytes and size != shard.bytes:
                raise ShardIntegrityError(f"{size} bytes, the manifest says {shard.bytes}")
            if digest.hexdigest() != shard.sha256:
                raise ShardIntegrityError(f"sha256 {digest.hexdigest()[:16]}... differs from the manifest's "
                                          f"{shard.sha256[:16]}...")
            spool.flush()
            for sample in local_members(spool.name):
                yield sample
    except Exception as exc:  # noqa: BLE001 - any read failure of one shard must not stop training
        log.warning("skipping shard %s: %s", shard_name(shard.url), exc)
        yield {"__key__": "__corrupt__", "__error__": str(exc)}


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised int16 tensor for one batch; inside a loader worker its storage is allocated in shared
    memory (as the DataLoader's default collate does), so sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.int16)
    proto = torch.empty(0, dtype=torch.int16)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return proto.new(storage).resize_(shape)


class CropBatches(IterableDataset):
    """:meth:`CropStream.batches` as a dataset, for a DataLoader without automatic batching."""

    def __init__(self, stream: CropStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict]:
        return self.stream.batches()


def _as_is(batch: dict) -> dict:
    return batch  # batches are whole already (CropBatches); a module-level function pickles for any start method


def make_loader(cfg: DataConfig, shards: list[ShardInfo], *, rank: int, world_size: int, batch_size: int,
                batches_consumed: int = 0, seed: int | None = None, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader over :class:`CropStream` whose batches are ``{"crop": int16 (B, 1, S, S, S) HU, "meta":
    [...]}`` (window them on the device: :func:`mim_scale.data.window.hu_window`).

    ``pin_memory`` (default: when CUDA is available): batches come out in page-locked memory, so the
    host-to-device copy can be asynchronous (``non_blocking=True``) and runs at full bus speed.
    """
    dataset = CropStream(cfg, shards, rank=rank, world_size=world_size, batch_size=batch_size,
                         batches_consumed=batches_consumed, seed=seed)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(CropBatches(dataset), batch_size=None, num_workers=cfg.num_workers, collate_fn=_as_is,
                      pin_memory=pin, persistent_workers=False, prefetch_factor=2 if cfg.num_workers else None)
