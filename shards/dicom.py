"""DICOM: find series in a folder tree, then assemble one series into a HU volume.

Discovery reads headers only (no pixels) and groups image objects by SeriesInstanceUID. Assembly
reads the pixels of one series, sorts the slices along the slice normal (the cross product of the
ImageOrientationPatient row and column cosines; never by InstanceNumber or file name), checks the
stack, applies RescaleSlope/Intercept and returns a :class:`Volume` in scanner index order (not yet
canonical). Classic single-frame CT and enhanced multi-frame CT (per-frame PlanePosition) are built.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError

from mim_scale.shards import fileio
from mim_scale.shards.geometry import Volume
from mim_scale.shards.rejects import InputRejected

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
_LOCALIZER_WORDS = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"}
MAX_SPACING_MM = 30.0


@dataclass
class SeriesRef:
    """Files of one DICOM series found by discovery. ``uid`` is private (never leaves the driver's
    private outputs); ``modality`` is the first file's Modality."""

    uid: str
    files: list[str] = field(default_factory=list)
    modality: str = ""
    multiframe: bool = False


@dataclass
class FileReject:
    path: str
    reason: str
    detail: str


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """No value validation and no warnings while datasets are read and their values converted:
    pydicom's validation warnings and log lines quote tag values (UIDs, names), which must not reach logs."""
    mode = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom.config.settings.reading_validation_mode = mode


def _read(path: str, stop_before_pixels: bool) -> pydicom.Dataset:
    """Read one DICOM file through fileio (so failures can be injected), mapping errors to reasons."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputRejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}", path) from exc
    if size == 0:
        raise InputRejected("empty_file", "0 bytes", path)
    try:
        with fileio.open_input(path) as f, quiet_pydicom():
            defer = None if not stop_before_pixels else "4 KB"
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=stop_before_pixels, defer_size=defer)
            except InvalidDicomError:
                # old exports omit the preamble and file meta: accept a stream that starts with a
                # plausible group 0008 element, refuse anything else
                f.seek(0)
                if f.read(2) not in (b"\x08\x00", b"\x00\x08"):
                    raise
                f.seek(0)
                ds = pydicom.dcmread(f, stop_before_pixels=stop_before_pixels, defer_size=defer, force=True)
                if "TransferSyntaxUID" not in ds.file_meta:
                    implicit, little = ds.original_encoding
                    ds.file_meta.TransferSyntaxUID = (
                        pydicom.uid.ImplicitVRLittleEndian if implicit
                        else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
                    )
            if not stop_before_pixels and "PixelData" in ds:
                _ = ds.PixelData  # force the read while the file is open
    except InputRejected:
        raise
    except PermissionError as exc:
        raise InputRejected("unreadable", f"PermissionError: {exc}", path) from exc
    except InvalidDicomError as exc:
        raise InputRejected("not_dicom", str(exc)[:200], path) from exc
    except (EOFError, struct.error) as exc:
        raise InputRejected("truncated", f"{type(exc).__name__}: {exc}"[:200], path) from exc
    except OSError as exc:
        raise InputRejected("unreadable", f"{type(exc).__name__}: {exc}"[:200], path) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise InputRejected("not_dicom", f"{type(exc).__name__}: {exc}"[:200], path) from exc
    return ds


def _sop_class(ds: pydicom.Dataset) -> str:
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return uid


def _modality(ds: pydicom.Dataset) -> str:
    mod = str(ds.get("Modality", "") or "").upper()
    if not mod and _sop_class(ds) in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE):
        mod = "CT"
    return mod


def _is_localizer(ds: pydicom.Dataset) -> bool:
    image_type = ds.get("ImageType", []) or []
    if isinstance(image_type, str):
        image_type = [image_type]
    return any(str(v).upper() in _LOCALIZER_WORDS for v in image_type)


def discover(files: list[str], root: str | None = None) -> tuple[list[SeriesRef], list[FileReject]]:
    """Headers of ``files`` -> series (sorted by first file path) and per-file rejects.

    Files are grouped by SeriesInstanceUID; where it is absent, by (folder relative to ``root``,
    SeriesNumber, image size, orientation).

    Non-image objects, unreadable and non-DICOM files become rejects; localizers are dropped (one
    reject each); non-CT series are returned too (the builder rejects them with ``non_ct_modality``).
    """
    with quiet_pydicom():
        return _discover(files, root)


def _discover(files: list[str], root: str | None) -> tuple[list[SeriesRef], list[FileReject]]:
    series: dict[str, SeriesRef] = {}
    rejects: list[FileReject] = []
    for path in files:
        try:
            ds = _read(path, stop_before_pixels=True)
        except InputRejected as rej:
            rejects.append(FileReject(path, rej.reason, rej.detail))
            continue
        if len(ds) == 0:
            rejects.append(FileReject(path, "truncated", "no data elements after the file meta"))
            continue
        if "Rows" not in ds and "PixelData" not in ds:
            rejects.append(FileReject(path, "not_image", f"SOP class {_sop_class(ds) or 'unknown'}"))
            continue
        if _is_localizer(ds):
            rejects.append(FileReject(path, "localizer", "ImageType marks a localizer"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            # some exports strip the UIDs: group by folder, series number and image frame instead
            rel = os.path.relpath(os.path.dirname(path), root) if root else os.path.dirname(path)
            iop = ds.get("ImageOrientationPatient", None)
            iop_key = ",".join(f"{float(v):.3f}" for v in iop) if iop else ""
            uid = f"nouid|{rel}|{ds.get('SeriesNumber', '')}|{ds.get('Rows', '')}x{ds.get('Columns', '')}|{iop_key}"
        frames = _int(ds.get("NumberOfFrames", 1), 1)
        ref = series.setdefault(uid, SeriesRef(uid=uid, modality=_modality(ds)))
        ref.files.append(path)
        if frames > 1 or _sop_class(ds) == ENHANCED_CT_IMAGE_STORAGE:
            ref.multiframe = True
    out = sorted(series.values(), key=lambda s: min(s.files))
    for s in out:
        s.files.sort()
    return out, rejects


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _floats(value: Any, n: int, what: str, source: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputRejected("missing_geometry", f"{what} is malformed", source) from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputRejected("missing_geometry", f"{what} must have {n} finite values", source)
    return arr


@dataclass
class _Slice:
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray
    rows: int
    cols: int
    pixels: _Rescaled  # (rows, cols) stored values + rescale
    source: str


@dataclass
class _Rescaled:
    """Stored pixels plus their RescaleSlope/Intercept; HU are computed once, into the stacked volume."""

    raw: np.ndarray
    slope: float
    intercept: float

    def into(self, out: np.ndarray) -> None:
        np.multiply(self.raw, np.float32(self.slope), out=out, casting="unsafe")
        if self.intercept != 0.0:
            out += np.float32(self.intercept)


def _rescale(pix: np.ndarray, slope: Any, intercept: Any) -> _Rescaled:
    try:
        s = float(slope) if slope not in (None, "") else 1.0
        b = float(intercept) if intercept not in (None, "") else 0.0
    except (TypeError, ValueError) as exc:
        raise InputRejected("pixel_decode_failed", f"RescaleSlope/Intercept {slope!r}/{intercept!r} are not numbers") from exc
    if not (math.isfinite(s) and math.isfinite(b)) or s == 0.0:
        raise InputRejected("pixel_decode_failed", f"RescaleSlope/Intercept {s}/{b} are unusable")
    return _Rescaled(pix, s, b)


def _pixels(ds: pydicom.Dataset, source: str) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InputRejected("missing_pixel_data", "no PixelData element", source)
    if _int(ds.get("SamplesPerPixel", 1), 1) != 1:
        raise InputRejected("not_grayscale", f"SamplesPerPixel={ds.get('SamplesPerPixel')}", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt streams
        raise InputRejected("pixel_decode_failed", f"{type(exc).__name__}: {exc}"[:300], source) from exc


def _classic_slices(files: list[str]) -> list[_Slice]:
    slices = []
    for path in files:
        ds = _read(path, stop_before_pixels=False)
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if kw not in ds or ds[kw].value in (None, ""):
                raise InputRejected("missing_geometry", f"no {kw}", path)
        pix = _pixels(ds, path)
        if pix.ndim != 2:
            raise InputRejected("not_3d", f"pixel array of shape {pix.shape} in a single-frame series", path)
        slices.append(_Slice(
            ipp=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", path),
            iop=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path),
            pixel_spacing=_floats(ds.PixelSpacing, 2, "PixelSpacing", path),
            rows=int(pix.shape[0]),
            cols=int(pix.shape[1]),
            pixels=_rescale(pix, ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)),
            source=path,
        ))
    return slices


def _first(seq_owner: Any, seq: str, kw: str) -> Any:
    if seq_owner is None or seq not in seq_owner or not seq_owner[seq].value:
        return None
    item = seq_owner[seq].value[0]
    return item[kw].value if kw in item else None


def _enhanced_slices(path: str) -> list[_Slice]:
    ds = _read(path, stop_before_pixels=False)
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    n = _int(ds.get("NumberOfFrames", 1), 1)
    if per_frame is None or len(per_frame) != n:
        raise InputRejected("enhanced_multiframe_unsupported", "no per-frame functional groups", path)
    pix = _pixels(ds, path)
    if pix.ndim == 2:
        pix = pix[None]
    if pix.shape[0] != n:
        raise InputRejected("pixel_decode_failed", f"{pix.shape[0]} frames decoded, {n} declared", path)
    out = []
    for i, frame in enumerate(per_frame):
        def get(seq: str, kw: str) -> Any:
            v = _first(frame, seq, kw)
            return v if v is not None else _first(shared, seq, kw)

        ipp, iop, ps = get("PlanePositionSequence", "ImagePositionPatient"), get(
            "PlaneOrientationSequence", "ImageOrientationPatient"), get("PixelMeasuresSequence", "PixelSpacing")
        if ipp is None or iop is None or ps is None:
            raise InputRejected("enhanced_multiframe_unsupported", f"frame {i} lacks plane position/orientation/spacing", path)
        slope = get("PixelValueTransformationSequence", "RescaleSlope")
        intercept = get("PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None:
            slope, intercept = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
        src = f"{path}#frame{i}"
        out.append(_Slice(
            ipp=_floats(ipp, 3, "ImagePositionPatient", src), iop=_floats(iop, 6, "ImageOrientationPatient", src),
            pixel_spacing=_floats(ps, 2, "PixelSpacing", src), rows=int(pix.shape[1]), cols=int(pix.shape[2]),
            pixels=_rescale(pix[i], slope, intercept), source=src,
        ))
    return out


@dataclass(frozen=True)
class StackTolerances:
    """How strict series assembly is. ``spacing_rel``: allowed relative deviation of a slice gap from
    the median gap; ``tilt_deg``: allowed angle between the slice stacking direction and the normal."""

    spacing_rel: float = 0.1
    tilt_deg: float = 1.0
    orientation_atol: float = 1e-3
    min_slices: int = 4


def assemble(slices: list[_Slice], tol: StackTolerances, source: str) -> Volume:
    """Sort slices along the normal, check the stack, and return the volume (scanner index order).

    Array axes: D = slice order (ascending along the normal), H = image rows, W = image columns.
    """
    if len(slices) < tol.min_slices:
        raise InputRejected("too_few_slices", f"{len(slices)} slice(s), need {tol.min_slices}", source)
    iop0 = slices[0].iop
    for s in slices[1:]:
        if np.max(np.abs(s.iop - iop0)) > tol.orientation_atol:
            raise InputRejected("mixed_orientations", f"{s.source} orientation differs from {slices[0].source}", source)
    for s in slices[1:]:
        if (s.rows, s.cols) != (slices[0].rows, slices[0].cols) or np.max(np.abs(s.pixel_spacing - slices[0].pixel_spacing)) > 1e-4:
            raise InputRejected("mixed_dimensions", f"{s.source} differs in size or pixel spacing", source)
    row_cos, col_cos = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row_cos) - 1) > 0.01 or abs(np.linalg.norm(col_cos) - 1) > 0.01 or abs(row_cos @ col_cos) > 0.01:
        raise InputRejected("missing_geometry", f"ImageOrientationPatient {iop0.tolist()} is not two unit orthogonal vectors", source)
    row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)
    dist = np.asarray([s.ipp @ normal for s in slices])
    order = np.argsort(dist, kind="stable")
    slices = [slices[i] for i in order]
    dist = dist[order]
    gaps = np.diff(dist)
    ps = slices[0].pixel_spacing
    if np.any(gaps < 1e-3):
        i = int(np.argmax(gaps < 1e-3))
        raise InputRejected("duplicate_positions", f"{slices[i].source} and {slices[i + 1].source} at {dist[i]:.3f} mm", source)
    med = float(np.median(gaps))
    if not (0 < ps[0] <= MAX_SPACING_MM and 0 < ps[1] <= MAX_SPACING_MM and med <= MAX_SPACING_MM):
        raise InputRejected("absurd_spacing", f"pixel spacing {ps.tolist()}, slice gap {med:.3f} mm", source)
    dev = np.abs(gaps - med) / med
    if np.any(dev > tol.spacing_rel):
        i = int(np.argmax(dev))
        ratio = gaps[i] / med
        if ratio > 1.5 and abs(ratio - round(ratio)) < tol.spacing_rel * round(ratio):
            raise InputRejected("missing_slices", f"gap of {gaps[i]:.3f} mm (~{round(ratio) - 1} slice(s) missing) after {slices[i].source}", source)
        raise InputRejected("irregular_spacing", f"gaps from {gaps.min():.3f} to {gaps.max():.3f} mm", source)
    step = slices[-1].ipp - slices[0].ipp
    cosang = abs(step @ normal) / max(np.linalg.norm(step), 1e-9)
    tilt = math.degrees(math.acos(min(1.0, cosang)))
    if tilt > tol.tilt_deg:
        raise InputRejected("gantry_tilt", f"slices step {tilt:.2f} deg off the normal", source)
    arr = np.empty((len(slices), slices[0].rows, slices[0].cols), dtype=np.float32)
    for k, s in enumerate(slices):
        s.pixels.into(arr[k])
    dz = float((dist[-1] - dist[0]) / (len(slices) - 1))
    direction = np.stack([row_cos, col_cos, normal], axis=1)
    # PixelSpacing is (row spacing, column spacing) = (H step, W step)
    spacing = (float(ps[1]), float(ps[0]), dz)
    return Volume(arr, spacing, tuple(slices[0].ipp), direction)


def load_series(
    files: list[str], tol: StackTolerances | None = None, multiframe: bool | None = None, max_voxels: int = 1 << 30
) -> Volume:
    """Read and assemble one series (all files of one SeriesInstanceUID) -> float32 HU Volume.

    The volume is in scanner order; pass it through ``geometry.canonicalize`` for the stored orientation.
    Raises InputRejected with a named reason.
    """
    with quiet_pydicom():
        return _load_series(files, tol or StackTolerances(), multiframe, max_voxels)


def _load_series(files: list[str], tol: StackTolerances, multiframe: bool | None, max_voxels: int) -> Volume:
    source = os.path.commonpath(files) if len(files) > 1 else files[0]
    # declared size first: a tiny file may declare a huge image
    ds = _read(files[0], stop_before_pixels=True)
    frames = _int(ds.get("NumberOfFrames", 1), 1)
    declared = _int(ds.get("Rows", 0), 0) * _int(ds.get("Columns", 0), 0) * max(frames, 1) * len(files)
    if declared > max_voxels:
        raise InputRejected("too_large", f"{declared} voxels declared, limit {max_voxels}", source)
    if multiframe is None:
        multiframe = len(files) == 1 and (frames > 1 or _sop_class(ds) == ENHANCED_CT_IMAGE_STORAGE)
    if multiframe:
        if len(files) != 1:
            raise InputRejected("enhanced_multiframe_unsupported", f"{len(files)} multi-frame files in one series", source)
        slices = _enhanced_slices(files[0])
    else:
        slices = _classic_slices(files)
    return assemble(slices, tol, source)


def list_files(root: Path) -> list[str]:
    """Every regular file under ``root`` (sorted, symlinks to folders not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            out.append(os.path.join(dirpath, name))
    return out
