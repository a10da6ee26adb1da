"""One unit of build work: a DICOM series or a NIfTI / MetaImage / NRRD file -> encoded sample bytes, or a named reject.

``process_item`` is a pure function of its arguments (same input -> same bytes), runs in-process
(``workers=0``) or as a Ray task, and never raises for bad input: every failure comes back as a
result with a reason code.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from mim_scale.shards import dicom, geometry, itkimage, nifti
from mim_scale.shards.format import AXIS_ORDER, DTYPE, FORMAT_NAME, FORMAT_VERSION, affine_ras, encode_volume
from mim_scale.shards.limits import DEFAULT_WORKER_MEMORY_BYTES, LOAD_FLOAT_BYTES, MemoryLimits
from mim_scale.shards.rejects import InputRejected


@dataclass(frozen=True)
class WorkerSettings:
    """The per-volume part of the build config (see ``BuildConfig``)."""

    spacing: float = 1.5
    codec: str = "npy"
    gzip_level: int = 1
    crop_body: bool = False
    min_slices: int = 4
    slice_spacing_tolerance: float = 0.1
    max_tilt_deg: float = 1.0
    min_size_voxels: int = 8
    # resident memory one worker may use: every size an input declares is checked against it (limits.py)
    worker_memory_bytes: int = DEFAULT_WORKER_MEMORY_BYTES
    # DICOM screening (dicom.Screening): refused by default, each allowed by its option
    allow_non_ct_sop_class: bool = False
    allow_burned_in_annotation: bool = False
    allow_derived: bool = False

    def limits(self) -> MemoryLimits:
        """The memory caps of this worker (readers check declared sizes against them before allocating)."""
        return MemoryLimits(self.worker_memory_bytes)

    def screening(self) -> dicom.Screening:
        return dicom.Screening(self.allow_non_ct_sop_class, self.allow_burned_in_annotation, self.allow_derived)

    @property
    def max_voxels(self) -> int:
        """A voxel cap for readers that take a count: the budget over the float32 load bytes per voxel (prefer
        ``limits().check_source``, which also counts the stored sample size)."""
        return self.limits().budget_bytes // (LOAD_FLOAT_BYTES + 1)


@dataclass(frozen=True)
class WorkItem:
    """index: position in the build plan; key: de-identified sample key; source: private description."""

    index: int
    key: str
    dataset: str
    kind: str  # "dicom" | "nifti" | "metaimage" | "nrrd"
    files: tuple[str, ...]
    source: str
    multiframe: bool = False


@dataclass
class ItemResult:
    index: int
    key: str
    dataset: str
    source: str
    reason: str | None = None  # None when built
    detail: str = ""
    volume_bytes: bytes = b""
    meta_bytes: bytes = b""
    content_sha256: str = ""
    raw_bytes: int = 0  # int16 size of the stored volume
    voxels: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    meta: dict = field(default_factory=dict)
    face_bearing: str = ""  # why the scan may show a face (private; '' when nothing says so)


def content_hash(vol: np.ndarray) -> str:
    """sha256 over the shape and the C-order int16 bytes of a built volume (identity of the content)."""
    h = hashlib.sha256(f"{DTYPE}{list(vol.shape)}".encode())
    h.update(memoryview(np.ascontiguousarray(vol)).cast("B"))  # no copy of the volume
    return h.hexdigest()


def _slabs(vol: np.ndarray, voxels: int = 1 << 22) -> list[np.ndarray]:
    """Views of ``vol`` along axis 0 of about ``voxels`` each: whole-volume temporaries stay small."""
    step = max(1, voxels // max(1, vol[0].size))
    return [vol[i:i + step] for i in range(0, vol.shape[0], step)]


def hu_stats(vol: np.ndarray) -> dict[str, float]:
    """min/max/mean/std over all voxels; percentiles over a fixed 1-in-7 subsample (cheap, deterministic).
    The moments are summed slab by slab in float64 (no float64 copy of the whole volume)."""
    sub = vol.ravel()[::7].astype(np.float32)
    p1, p50, p99 = np.percentile(sub, [1, 50, 99])
    mean = sum(float(s.sum(dtype=np.float64)) for s in _slabs(vol)) / vol.size
    var = sum(float(np.square(s.astype(np.float64) - mean).sum()) for s in _slabs(vol)) / vol.size
    return {
        "min": int(vol.min()), "max": int(vol.max()),
        "mean": round(mean, 3), "std": round(float(np.sqrt(var)), 3),
        "p01": float(p1), "p50": float(p50), "p99": float(p99),
    }


def check_finite(vol: np.ndarray, source: str) -> None:
    """Reject NaN/Inf voxels (float pixel data, or a rescale that overflows float32): cast to int16 they would
    become arbitrary values that pass every later check."""
    bad = sum(int(np.count_nonzero(~np.isfinite(s))) for s in _slabs(vol))
    if bad:
        raise InputRejected("non_finite_values", f"{bad} NaN/Inf voxel(s)", source)


def load_volume(item: WorkItem, settings: WorkerSettings, notes: dict[str, str] | None = None) -> geometry.Volume:
    """Source -> canonical float32 HU Volume at the source resolution (no resampling).

    Sizes are checked against ``settings.limits()`` before anything is allocated; DICOM is screened with
    ``settings.screening()``; NaN/Inf voxels are rejected, whatever the reader. ``notes`` receives private
    findings (``face_bearing``).
    """
    if item.kind == "nifti":
        vol = nifti.load_nifti(item.files[0], settings.limits())
    elif item.kind in ("metaimage", "nrrd"):
        vol = itkimage.load_itk(item.files[0], settings.max_voxels, limits=settings.limits())
    elif item.kind == "dicom":
        tol = dicom.StackTolerances(
            spacing_rel=settings.slice_spacing_tolerance, tilt_deg=settings.max_tilt_deg, min_slices=settings.min_slices
        )
        files = list(item.files)
        headers = dicom.read_headers(files, settings.limits(), settings.screening(), item.source)
        if notes is not None and headers.face_bearing:
            notes["face_bearing"] = headers.face_bearing
        vol = dicom.load_series(files, tol, multiframe=item.multiframe, limits=settings.limits(), headers=headers)
    else:
        raise ValueError(f"unknown item kind {item.kind!r}")
    check_finite(vol.array, item.source)
    return geometry.canonicalize(vol)


def build_volume(item: WorkItem, settings: WorkerSettings, notes: dict[str, str] | None = None) -> tuple[np.ndarray, dict]:
    """Source -> ((D, H, W) int16 volume on the build grid, metadata dict). ``notes``: see ``load_volume``."""
    vol = load_volume(item, settings, notes)
    # the output grid is bounded before it is allocated: 64^3 at 30 mm would be 1280^3 at 1.5 mm
    out_shape = geometry.resampled_shape(vol.array.shape, vol.spacing, settings.spacing)
    settings.limits().check_resample(vol.array.shape, out_shape, item.source)
    vol = geometry.resample_isotropic(vol, settings.spacing)
    if settings.crop_body:
        vol = geometry.crop_to_body(vol)
    if float(vol.array.min()) > -200.0:
        raise InputRejected("not_ct_intensity", f"minimum value {float(vol.array.min()):.1f}", item.source)
    if min(vol.array.shape) < settings.min_size_voxels:
        raise InputRejected("too_small", f"shape {vol.array.shape} after resampling", item.source)
    arr = geometry.to_int16_hu(vol.array)
    direction = [round(float(v), 9) + 0.0 for v in vol.direction.ravel()]
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "key": item.key,
        "dataset": item.dataset,
        "source_format": item.kind,
        "shape": list(arr.shape),
        "axis_order": AXIS_ORDER,
        "dtype": DTYPE,
        "spacing": [float(s) for s in vol.spacing],
        "origin": [round(float(o), 6) + 0.0 for o in vol.origin],
        "direction": direction,
        "affine_ras": [[round(v, 6) + 0.0 for v in row] for row in affine_ras(vol.spacing, vol.origin, vol.direction)],
        "hu_stats": hu_stats(arr),
        "content_sha256": content_hash(arr),
    }
    return arr, meta


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def process_item(item: WorkItem, settings: WorkerSettings) -> ItemResult:
    """Build one item; never raises for bad input (the reason comes back in the result)."""
    t0 = time.perf_counter()
    res = ItemResult(index=item.index, key=item.key, dataset=item.dataset, source=item.source)
    notes: dict[str, str] = {}
    try:
        arr, meta = build_volume(item, settings, notes)
        res.volume_bytes = encode_volume(arr, settings.codec, settings.gzip_level)
        res.meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
        res.content_sha256 = meta["content_sha256"]
        res.raw_bytes = int(arr.nbytes)
        res.voxels = int(arr.size)
        res.meta = meta
    except InputRejected as rej:
        res.reason, res.detail = rej.reason, rej.detail
        if rej.source and rej.source != item.source:
            res.detail = f"{rej.source}: {rej.detail}"
    except MemoryError:
        res.reason, res.detail = "too_large", "out of memory while building"
    except Exception as exc:  # noqa: BLE001 - an unexpected failure must not stop the build
        res.reason = "read_failed"
        res.detail = f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3)}"[:2000]
    res.face_bearing = notes.get("face_bearing", "")
    res.seconds = time.perf_counter() - t0
    res.peak_rss_bytes = _peak_rss()
    return res
