"""``build_shards``: inputs -> de-identified WebDataset shards + manifest, in parallel, resumable.

Flow: discover inputs (driver) -> plan (work items sorted by their salted key) -> build items
(in-process or Ray tasks, bounded in flight) -> write results strictly in plan order into shards ->
checkpoint each closed shard in the private journal -> manifest + public report + private rejects.

Determinism: the plan order, the volume bytes and the tar bytes depend only on the inputs, the
config and the salt (kept in the private dir), so a re-run gives the same shards and an identical
manifest. Resume: a re-run with the same plan skips every shard the journal lists whose file still
has the recorded sha256, and restarts after the last one.

Outputs:
* shareable ``OUT/``: ``shard-NNNNNN.tar``, ``manifest.json``, ``build_report.json`` (counts only);
* private ``OUT.private/`` (or ``private_dir``): ``salt.txt``, ``rejects.jsonl``, ``linkage.jsonl``
  (key -> source path, dataset, content hash), ``journal.jsonl``, ``build_config.json`` (inputs too).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import time
from collections import Counter as CountDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mim_scale.errors import UserFacingError
from mim_scale.fileutil import fsync_dir
from mim_scale.ray_session import start_or_join
from mim_scale.shards import dicom, formats, metrics, outputs, recipes
from mim_scale.shards.format import CODECS, MANIFEST_NAME, ShardInfo
from mim_scale.shards.inputs import InputSpec, parse_inputs
from mim_scale.shards.journal import JOURNAL_NAME, Journal, JournalState, load_journal, plan_fingerprint
from mim_scale.shards.worker import ItemResult, WorkerSettings, WorkItem, process_item
from mim_scale.shards.writer import TMP_SUFFIX, ShardFile, write_durable

log = logging.getLogger("mim_scale.shards")

KEY_HEX = 32


@dataclass
class RejectRecord:
    """A not-built input. ``source`` and ``detail`` are private; ``reason`` is a public code."""

    source: str
    reason: str
    detail: str
    dataset: str
    key: str = ""

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass
class BuildReport:
    """What a build did. Counts cover the whole set (resumed shards included); ``built_now`` and
    ``seconds`` cover this run only."""

    out: Path
    private_dir: Path
    manifest_path: Path
    num_samples: int
    num_shards: int
    shard_bytes: int
    raw_bytes: int  # int16 bytes of all stored volumes
    voxels: int
    datasets: dict[str, int]
    rejected: dict[str, int]  # reason -> count (duplicates and exclusions included)
    built_now: int
    resumed_items: int
    seconds: float
    workers: int
    peak_worker_rss_bytes: int
    worker_seconds: float = 0.0
    found: dict[str, int] = field(default_factory=dict)  # CT volumes found per dataset, before de-duplication

    @property
    def volumes_per_minute(self) -> float:
        return 60.0 * self.built_now / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_voxel(self) -> float:
        return self.shard_bytes / self.voxels if self.voxels else 0.0


@dataclass(frozen=True)
class BuildConfig(WorkerSettings):
    """Everything that decides the output bytes (recorded in the manifest): the per-volume settings the
    workers get, plus how volumes are grouped into shards."""

    target_shard_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if not (0.1 <= self.spacing <= 20.0):
            raise UserFacingError(f"spacing {self.spacing} mm: expected 0.1 .. 20")
        if self.target_shard_bytes < 1:
            raise UserFacingError("target_shard_bytes must be positive")
        if self.codec not in CODECS:
            raise UserFacingError(f"codec {self.codec!r}: expected one of {CODECS}")
        if not (0 <= self.gzip_level <= 9):
            raise UserFacingError("gzip_level must be 0..9")
        if self.min_slices < 2:
            raise UserFacingError("min_slices must be >= 2")
        try:
            self.limits()
        except ValueError as exc:
            raise UserFacingError(f"--worker-memory: {exc}") from exc

    def worker_settings(self) -> WorkerSettings:
        """The per-volume part alone (what travels to each worker task)."""
        fields = {f.name for f in dataclasses.fields(WorkerSettings)}
        return WorkerSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


# ---------------------------------------------------------------- planning


def _load_salt(private_dir: Path) -> bytes:
    path = private_dir / "salt.txt"
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    salt = secrets.token_bytes(32)
    write_durable(path, (salt.hex() + "\n").encode())
    return salt


def source_key(salt: bytes, dataset: str, kind: str, identity: str) -> str:
    """De-identified sample key: HMAC-SHA256(salt, dataset / kind / identity), 32 hex chars."""
    msg = f"{dataset}\x00{kind}\x00{identity}".encode()
    return hmac.new(salt, msg, hashlib.sha256).hexdigest()[:KEY_HEX]


DISCOVER_CHUNK = 512  # files per header-reading task


def _discover_all(chunks: list[tuple[list[str], str]], pool: "_InProcess | _RayPool | None") -> tuple[list[dicom.SeriesRef], list[dicom.FileReject]]:
    """Header-read every chunk (in parallel on the pool) and merge series split across chunks."""
    parts = pool.map_discover(chunks) if pool is not None else [dicom.discover(f, r) for f, r in chunks]
    merged: dict[str, dicom.SeriesRef] = {}
    rejects: list[dicom.FileReject] = []
    for series, rej in parts:
        rejects.extend(rej)
        for s in series:
            m = merged.setdefault(s.uid, dicom.SeriesRef(uid=s.uid, modality=s.modality))
            m.files.extend(s.files)
            m.multiframe = m.multiframe or s.multiframe
    for m in merged.values():
        m.files.sort()
    return sorted(merged.values(), key=lambda s: s.files[0]), rejects


def plan_inputs(
    specs: list[InputSpec], salt: bytes, pool: "_InProcess | _RayPool | None" = None
) -> tuple[list[WorkItem], list[RejectRecord]]:
    """Discover every input -> (work items sorted by key, with their plan index; discovery rejects).

    DICOM headers are read in chunks of DISCOVER_CHUNK files, as parallel tasks when ``pool`` is Ray.
    An input named after a collection recipe is read with it (``recipes.select``); DICOM series that
    another collection holds as a file named by their SeriesInstanceUID are dropped (``duplicate_series``).
    """
    plan = _Plan(salt)
    for spec in specs:
        plan.add_input(spec, pool)
    return plan.finish()


class _Plan:
    """A plan being built: work items with unique salted keys, rejects, and the SeriesInstanceUIDs seen as file
    names and as DICOM series (for ``recipes.drop_duplicate_series``)."""

    def __init__(self, salt: bytes):
        self.salt = salt
        self.items: list[WorkItem] = []
        self.rejects: list[RejectRecord] = []
        self.seen_keys: dict[str, str] = {}
        self.named_uids: dict[str, tuple[str, str]] = {}  # SeriesInstanceUID -> (key, dataset) of files named by it
        self.dicom_uids: dict[str, tuple[str, str]] = {}

    def add(self, dataset: str, kind: str, identity: str, files: tuple[str, ...], source: str,
            multiframe: bool = False) -> str | None:
        """The new item's key, or None (rejected as ``duplicate_content``) when its identity is planned already."""
        key = source_key(self.salt, dataset, kind, identity)
        if key in self.seen_keys:
            self.rejects.append(RejectRecord(source, "duplicate_content", f"same source identity as {self.seen_keys[key]}", dataset, key))
            return None
        self.seen_keys[key] = source
        self.items.append(WorkItem(0, key, dataset, kind, files, source, multiframe))
        return key

    def add_input(self, spec: InputSpec, pool: "_InProcess | _RayPool | None") -> None:
        root = spec.path.resolve()
        if root.is_file():
            files = [str(root)]
            base = root.parent
        else:
            files = dicom.list_files(root)
            base = root
        sel = recipes.select(spec.dataset, files, base, spec.path)
        self.rejects.extend(RejectRecord(path, reason, detail, spec.dataset) for path, reason, detail in sel.rejects)
        for kind, f, uid in sel.volumes:
            key = self.add(spec.dataset, kind, os.path.relpath(f, base), (f,), f)
            if key and uid:
                self.named_uids.setdefault(uid, (key, spec.dataset))
        other = sel.dicom_files
        chunks = [(other[i:i + DISCOVER_CHUNK], str(base)) for i in range(0, len(other), DISCOVER_CHUNK)]
        series, file_rejects = _discover_all(chunks, pool)
        for r in file_rejects:
            reason, detail = formats.refine_not_dicom(r.path, r.reason, r.detail)
            self.rejects.append(RejectRecord(r.path, reason, detail, spec.dataset))
        for s in series:
            source = os.path.commonpath(s.files) if len(s.files) > 1 else s.files[0]
            if s.modality != "CT":
                self.rejects.append(RejectRecord(source, "non_ct_modality", f"Modality {s.modality or 'missing'}, {len(s.files)} file(s)", spec.dataset))
                continue
            key = self.add(spec.dataset, "dicom", s.uid, tuple(s.files), source, s.multiframe)
            if key:
                self.dicom_uids.setdefault(s.uid, (key, spec.dataset))

    def finish(self) -> tuple[list[WorkItem], list[RejectRecord]]:
        """Drop DICOM series held elsewhere as named files, sort by key, number the items, sort the rejects."""
        items, rejects = self.items, self.rejects
        dropped = recipes.drop_duplicate_series(self.named_uids, self.dicom_uids)
        if dropped:
            by_key = {it.key: it for it in items}
            for key, kept in dropped.items():
                it = by_key[key]
                rejects.append(RejectRecord(it.source, "duplicate_series", f"same SeriesInstanceUID as {by_key[kept].source}", it.dataset, key))
            items = [it for it in items if it.key not in dropped]
        items.sort(key=lambda it: it.key)
        items = [dataclasses.replace(it, index=i) for i, it in enumerate(items)]
        rejects.sort(key=lambda r: (r.source, r.reason))
        return items, rejects


def read_exclude(path: Path) -> set[str]:
    """``--exclude`` file: one content sha256 (64 hex) or sample key (32 hex) per line; '#' comments."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserFacingError(f"{path}: cannot read exclude list ({exc})") from exc
    out = set()
    for n, line in enumerate(lines, start=1):
        tok = line.split("#", 1)[0].strip().lower()
        if not tok:
            continue
        if len(tok) not in (KEY_HEX, 64) or any(c not in "0123456789abcdef" for c in tok):
            raise UserFacingError(f"{path}:{n}: expected a 64-hex content hash or a {KEY_HEX}-hex sample key")
        out.add(tok)
    return out


# ---------------------------------------------------------------- execution


class _InProcess:
    def __init__(self) -> None:
        self.workers = 0

    def map_ordered(self, items: list[WorkItem], settings: WorkerSettings) -> Iterator[ItemResult]:
        for it in items:
            yield process_item(it, settings)

    def map_discover(self, chunks: list[tuple[list[str], str]]) -> list:
        return [dicom.discover(f, r) for f, r in chunks]

    def close(self) -> None:
        pass


class _RayPool:
    """Ray tasks with at most ``max_in_flight`` outstanding; results yielded in plan order."""

    def __init__(self, workers: int | None, address: str | None, max_in_flight: int | None):
        import ray

        self._ray = ray
        # the rule every stage shares: an address, else a submitted job's cluster, else a private local one
        self.started = start_or_join(address, local_cpus=workers or os.cpu_count() or 1,
                                     env_vars={"OMP_NUM_THREADS": "1"}, object_store_bytes=512 << 20,
                                     log_to_driver=False)
        cpus = int(ray.available_resources().get("CPU", 1)) or 1
        self.workers = workers or cpus
        self.max_in_flight = max_in_flight or 2 * self.workers
        self._task = ray.remote(num_cpus=1, max_retries=1)(process_item)
        self._discover = ray.remote(num_cpus=1, max_retries=1)(dicom.discover)

    def map_discover(self, chunks: list[tuple[list[str], str]]) -> list:
        if len(chunks) <= 1:
            return [dicom.discover(f, r) for f, r in chunks]
        return self._ray.get([self._discover.remote(f, r) for f, r in chunks])

    def map_ordered(self, items: list[WorkItem], settings: WorkerSettings) -> Iterator[ItemResult]:
        ray = self._ray
        settings_ref = ray.put(settings)
        pending: dict[Any, int] = {}  # object ref -> position in items
        done: dict[int, ItemResult] = {}
        nxt = 0
        submit = 0
        while nxt < len(items):
            while submit < len(items) and submit - nxt < self.max_in_flight:
                pending[self._task.remote(items[submit], settings_ref)] = submit
                submit += 1
            if nxt not in done:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    pos = pending.pop(ref)
                    try:
                        done[pos] = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a crashed worker rejects the item, not the build
                        it = items[pos]
                        done[pos] = ItemResult(it.index, it.key, it.dataset, it.source, reason="read_failed",
                                               detail=f"worker failed: {type(exc).__name__}")
                continue
            yield done.pop(nxt)
            nxt += 1

    def close(self) -> None:
        if self.started:
            self._ray.shutdown()


# ---------------------------------------------------------------- the build


def _result_record(r: ItemResult, reason: str | None, detail: str) -> dict[str, Any]:
    return {"index": r.index, "key": r.key, "dataset": r.dataset, "source": r.source, "reason": reason,
            "detail": detail, "content_sha256": r.content_sha256, "raw_bytes": r.raw_bytes, "voxels": r.voxels,
            "face_bearing": r.face_bearing}


def build_shards(
    inputs: list[InputSpec | str | Path],
    out: str | Path,
    *,
    spacing: float = 1.5,
    target_shard_bytes: int = 1 << 30,
    private_dir: str | Path | None = None,
    workers: int | None = None,
    address: str | None = None,
    max_in_flight: int | None = None,
    codec: str = "npy",
    crop_body: bool = False,
    exclude: set[str] | str | Path | None = None,
    config: BuildConfig | None = None,
    progress: bool = True,
    metrics_port: int | None = None,
    dataset: str = "default",
) -> BuildReport:
    """Build shards from ``inputs`` into ``out`` (see module doc).

    inputs: InputSpec, or strings ``PATH`` / ``NAME=PATH`` / a .csv/.txt list (see ``inputs.parse_inputs``).
    workers: 0 = build in this process (no Ray); None = a Ray task per volume on every CPU of the
        local cluster (or the one at ``address``); N = N CPUs when this call starts Ray. An already
        initialised Ray is reused and left running.
    config: overrides spacing/target_shard_bytes/codec/crop_body when given.
    exclude: content hashes / sample keys, or a file of them (``read_exclude``).
    dataset: the dataset name of inputs given without ``NAME=``.
    Raises UserFacingError for problems with the build as a whole; bad inputs are rejected, not raised.
    """
    t0 = time.perf_counter()
    cfg = config or BuildConfig(spacing=spacing, target_shard_bytes=target_shard_bytes, codec=codec, crop_body=crop_body)
    specs = parse_inputs(list(inputs), default_dataset=dataset)
    out = Path(out).resolve()
    private = Path(private_dir).resolve() if private_dir is not None else out.with_name(out.name + ".private")
    _check_folders(specs, out, private)
    excl = _exclude_set(exclude)
    _make_folders(out, private)
    if metrics_port is not None:
        metrics.start_server(metrics_port)

    lock = open(private / "build.lock", "w")  # noqa: SIM115 - held for the whole build
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock.close()
        raise UserFacingError(f"{out}: another build is writing here (lock {private / 'build.lock'})") from exc
    try:
        for stale in out.glob("*" + TMP_SUFFIX):
            stale.unlink()  # left by a killed build; safe now that the lock is ours
        salt = _load_salt(private)
        pool: _InProcess | _RayPool = _InProcess() if workers == 0 else _RayPool(workers, address, max_in_flight)
        try:
            return _build(specs, out, private, cfg, excl, salt, pool, progress, t0)
        finally:
            pool.close()
    finally:
        lock.close()


def _exclude_set(exclude: set[str] | str | Path | None) -> set[str]:
    """``exclude`` as lower-case hashes / keys: a file of them (``read_exclude``) or the values themselves."""
    if isinstance(exclude, (str, Path)):
        return read_exclude(Path(exclude))
    return {e.lower() for e in exclude} if exclude else set()


def _check_folders(specs: list[InputSpec], out: Path, private: Path) -> None:
    """The private folder is not inside the shareable one, and no input lies inside the output."""
    if private == out or out in private.parents:
        raise UserFacingError(f"{private}: the private dir must not be inside the shareable output {out}")
    for spec in specs:
        if spec.path.resolve() == out or out in spec.path.resolve().parents:
            raise UserFacingError(f"{spec.path}: input lies inside the output folder {out}")


def _make_folders(out: Path, private: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        private.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserFacingError(f"cannot create output folders {out} / {private}: {exc}") from exc
    os.chmod(private, 0o700)  # salt, linkage and rejects name the sources: this user's eyes only


def _build(specs: list[InputSpec], out: Path, private: Path, cfg: BuildConfig, excl: set[str], salt: bytes,
           pool: "_InProcess | _RayPool", progress: bool, t0: float) -> BuildReport:
    """Plan, resume from the journal, roll the results into shards (:func:`_roll`), write the outputs."""
    items, discovery_rejects = plan_inputs(specs, salt, pool)
    found = CountDict(it.dataset for it in items) + CountDict(r.dataset for r in discovery_rejects if r.reason == "duplicate_series")
    fingerprint = plan_fingerprint(cfg, items, excl)
    journal_path = private / JOURNAL_NAME
    state = load_journal(journal_path, fingerprint, out)
    resumed = state.next_item
    if resumed < len(items) or not (out / MANIFEST_NAME).exists():
        # the old manifest would describe shards that are about to change: nothing may look complete
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    log.info("plan: %d volume(s) to build, %d discovery reject(s); resuming at item %d with %d shard(s) done",
             len(items), len(discovery_rejects), resumed, len(state.shards))
    write_durable(private / "build_config.json", json.dumps({
        "config": dataclasses.asdict(cfg), "inputs": [{"path": str(s.path), "dataset": s.dataset} for s in specs],
        "private_dir": str(private), "out": str(out)}, indent=1, sort_keys=True).encode())

    bar = _progress(len(items), resumed, progress)
    roller = _ShardRoller(out, cfg, Journal(journal_path, fingerprint, state), state)
    counts = _roll(roller, pool, items, resumed, excl, cfg.worker_settings(), bar)

    # remove shards of an earlier, longer build in the same folder
    for p in out.glob("shard-*.tar"):
        if p.name not in {s.url for s in roller.shards}:
            p.unlink()
    if resumed == 0:
        for r in discovery_rejects:
            metrics.VOLUMES_REJECTED.labels(reason=r.reason).inc()
    summary = outputs.summarize(roller.records, [r.as_dict() for r in discovery_rejects])
    outputs.write_outputs(out, private, cfg, roller.shards, summary, found)
    metrics.write_textfile(private / "metrics.prom")
    built = summary.built
    report = BuildReport(
        out=out, private_dir=private, manifest_path=out / MANIFEST_NAME, num_samples=len(built),
        num_shards=len(roller.shards), shard_bytes=sum(s.bytes for s in roller.shards),
        raw_bytes=sum(r["raw_bytes"] for r in built), voxels=sum(r["voxels"] for r in built),
        datasets=summary.datasets, rejected=summary.rejected, built_now=counts.built_now, resumed_items=resumed,
        seconds=time.perf_counter() - t0, workers=pool.workers, peak_worker_rss_bytes=counts.peak_rss,
        worker_seconds=counts.worker_seconds, found=dict(sorted(found.items())),
    )
    log.info("built %d volume(s) into %d shard(s); %d input(s) rejected (%s); details in %s",
             report.num_samples, report.num_shards, len(summary.rejects),
             ", ".join(f"{k}={v}" for k, v in summary.rejected.items()) or "none", "rejects.jsonl of the private dir")
    faces = sum(1 for r in built if r.get("face_bearing"))
    if faces:
        log.warning("%d built volume(s) may show a face (head CT): face_bearing in linkage.jsonl of the private dir; "
                    "the builder does not deface", faces)
    return report


# ---------------------------------------------------------------- rolling results into shards


class _ShardRoller:
    """Built samples, in plan order -> shards of about ``cfg.target_shard_bytes``.

    State: ``shards`` (closed, in order) and ``records`` (journalled item records), both continuing the
    journal's valid prefix; ``pending`` (item records since the last journal line); ``current`` (the open
    shard, if any). A shard is closed, its rename fsynced, and only then recorded in the journal together
    with the pending records, so a resumed build never trusts a shard that might not be on disk."""

    def __init__(self, out: Path, cfg: BuildConfig, journal: Journal, state: JournalState):
        self.out = out
        self.cfg = cfg
        self.journal = journal
        self.shards = state.shards
        self.records = state.records
        self.pending: list[dict] = []
        self.current: ShardFile | None = None

    def add(self, res: ItemResult) -> None:
        """Append a built sample, first closing the open shard when the sample would push it past the target."""
        sample_bytes = len(res.volume_bytes) + len(res.meta_bytes) + 2048
        cur = self.current
        if cur is not None and cur.samples and cur.bytes_written + sample_bytes > self.cfg.target_shard_bytes:
            self.close_shard(res.index)
        if self.current is None:
            self.current = ShardFile(self.out, len(self.shards))
        self.current.add(res.key, [(self.cfg.codec, res.volume_bytes), ("json", res.meta_bytes)], res.dataset)

    def close_shard(self, next_item: int) -> None:
        assert self.current is not None
        try:
            info = self.current.finish()
        except OSError:
            self.current.abort()
            raise
        metrics.BYTES_WRITTEN.inc(info.bytes)
        self.shards.append(info)
        self.current = None
        fsync_dir(self.out)  # the shard's rename is durable before the journal says it is done
        self._checkpoint(next_item, info)

    def finish(self, total_items: int) -> None:
        """Close the last shard and write the journal's closing line."""
        if self.current is not None:
            self.close_shard(total_items)
        self._checkpoint(total_items, None)

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()

    def _checkpoint(self, next_item: int, shard: ShardInfo | None) -> None:
        self.journal.checkpoint(next_item, self.pending, shard)
        self.records.extend(self.pending)
        self.pending = []


@dataclass
class _RollCounts:
    """This run's counts (a resumed build's earlier items are not in them)."""

    built_now: int = 0
    rejected_now: int = 0
    peak_rss: int = 0
    worker_seconds: float = 0.0


def _results(pool: "_InProcess | _RayPool", todo: list[WorkItem], excl: set[str],
             settings: WorkerSettings) -> Iterator[ItemResult]:
    """One result per item of ``todo``, in plan order: excluded keys are never built, the rest come back from
    the pool."""
    built_iter = pool.map_ordered([it for it in todo if it.key not in excl], settings)
    for it in todo:
        if it.key in excl:
            yield ItemResult(it.index, it.key, it.dataset, it.source, reason="excluded", detail="sample key listed in the exclude file")
        else:
            yield next(built_iter)


def _roll(roller: _ShardRoller, pool: "_InProcess | _RayPool", items: list[WorkItem], start: int, excl: set[str],
          settings: WorkerSettings, bar: "_progress") -> _RollCounts:
    """Build ``items[start:]`` and roll them into shards; a built sample whose content (or key) is excluded or
    already built is rejected. Closes the journal and the bar; an OSError while writing aborts the open shard
    and becomes a UserFacingError (a re-run resumes)."""
    counts = _RollCounts()
    seen_content = {r["content_sha256"]: r["key"] for r in roller.records if r["reason"] is None and r["content_sha256"]}
    try:
        for res in _results(pool, items[start:], excl, settings):
            counts.peak_rss = max(counts.peak_rss, res.peak_rss_bytes)
            counts.worker_seconds += res.seconds
            reason, detail = res.reason, res.detail
            if reason is None:
                if res.content_sha256 in excl or res.key in excl:
                    reason, detail = "excluded", "listed in the exclude file"
                elif res.content_sha256 in seen_content:
                    reason, detail = "duplicate_content", f"same voxels as sample {seen_content[res.content_sha256]}"
            if reason is None:
                roller.add(res)
                seen_content[res.content_sha256] = res.key
                metrics.VOLUMES_BUILT.inc()
                counts.built_now += 1
            else:
                metrics.VOLUMES_REJECTED.labels(reason=reason).inc()
                counts.rejected_now += 1
            roller.pending.append(_result_record(res, reason, detail))
            bar.update(counts.built_now, counts.rejected_now)
        roller.finish(len(items))
    except OSError as exc:
        roller.abort()
        raise UserFacingError(f"writing shards to {roller.out} failed: {exc.strerror or exc} (re-run to resume)") from exc
    finally:
        roller.journal.close()
        bar.close()
    return counts


class _progress:
    """tqdm bar with built / rejected counts and throughput (stderr; no input names ever shown)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = None
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="vol", desc="shards", file=sys.stderr, dynamic_ncols=True)

    def update(self, built: int, rejected: int) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        rate = 60.0 * built / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"built={built} rejected={rejected} {rate:.1f} vol/min", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
