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

import zlib
from typing import BinaryIO

import numpy as np
import pydicom
import pydicom.config
import pydicom.filebase
import pydicom.filereader
import pydicom.encaps
import pydicom.pixels.utils
from pydicom.errors import InvalidDicomError

from mim_scale.shards import fileio
from mim_scale.shards.geometry import Volume
from mim_scale.shards.limits import MemoryLimits, format_bytes
from mim_scale.shards.rejects import InputRejected

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)
DEFLATED = pydicom.uid.DeflatedExplicitVRLittleEndian
_PIXEL_TAGS = {0x7FE00010, 0x7FE00009, 0x7FE00008}
_INFLATE_CHUNK = 1 << 16
# BodyPartExamined values and description words of scans that include the face (flagged in the private
# linkage report: a volume rendering of a head CT can be recognised; defacing is out of scope here)
_FACE_BODY_PARTS = {"HEAD", "BRAIN", "SKULL", "FACE", "HEADNECK", "HEAD_NECK", "SINUS", "ORBIT", "IAC", "TMJ", "JAW",
                    "MAXILLA", "MANDIBLE", "NOSE", "EAR", "WHOLEBODY", "WHOLE_BODY"}
_FACE_WORDS = ("HEAD", "BRAIN", "SKULL", "FACE", "FACIAL", "SINUS", "ORBIT", "CRANI", "NEURO", "DENTAL", "MAXILL",
               "MANDIB", "WHOLE BODY", "WHOLEBODY")
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


def inflate_capped(f: BinaryIO, cap: int) -> tuple[bytes, bool, bool]:
    """Inflate the raw deflate stream read from ``f`` up to ``cap`` bytes, never more.

    -> (inflated bytes, at most ``cap``; whether the output would exceed ``cap``; whether the stream ended).
    pydicom inflates a Deflated-transfer-syntax file whole, in one call, before it parses anything: a 2 MB
    file can hold 2 GiB of zeros, so every deflated file is inflated here instead, in bounded steps.
    """
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    total = 0
    while not d.eof:
        chunk = d.unconsumed_tail or f.read(_INFLATE_CHUNK)
        if not chunk:
            break
        # at most one byte over the cap: enough to know the cap was exceeded
        part = d.decompress(chunk, cap + 1 - total)
        total += len(part)
        parts.append(part)
        if total > cap:
            return b"".join(parts)[:cap], True, False
    return b"".join(parts), False, d.eof


_HEADER_INFLATE_FIRST = 1 << 16


def _read_deflated(f: BinaryIO, path: str, stop_before_pixels: bool, cap: int, defer: str | None) -> pydicom.Dataset:
    """Parse a Deflated Explicit VR Little Endian file whose preamble and file meta ``f`` has just read,
    inflating at most ``cap`` bytes. A header read inflates 64 KiB first and 4x more each time the pixel
    data is not reached yet, up to ``cap``: most headers need one step, none inflates more than it needs x 4."""
    start = f.tell()
    step = min(_HEADER_INFLATE_FIRST, cap) if stop_before_pixels else cap
    while True:
        f.seek(start)
        data, over, ended = inflate_capped(f, step)
        if not stop_before_pixels:
            if over:
                raise InputRejected("too_large", f"Deflated data inflates beyond {format_bytes(cap)} (header cap + "
                                                 "declared pixel data): refused before it is read", path)
            if not ended:
                raise InputRejected("truncated", "the deflate stream ends early", path)
        reached_pixels = []

        def at_pixels(tag: Any, vr: Any, length: int) -> bool:
            if int(tag) in _PIXEL_TAGS:
                reached_pixels.append(True)
                return True
            return False

        buf = pydicom.filebase.DicomBytesIO(data)
        del data
        inner = pydicom.filereader.read_dataset(buf, False, True, stop_when=at_pixels if stop_before_pixels else None,
                                                defer_size=defer)
        if not over or reached_pixels:
            return inner
        if step >= cap:
            raise InputRejected("too_large", f"DICOM header inflates beyond {format_bytes(cap)} before its pixel data",
                                path)
        step = min(4 * step, cap)


def _check_size(path: str, stop_before_pixels: bool, cap: int) -> None:
    """The file's size on disk: unreadable, empty, or (for a full read) larger than ``cap`` -> InputRejected."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputRejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}", path) from exc
    if size == 0:
        raise InputRejected("empty_file", "0 bytes", path)
    if not stop_before_pixels and size > cap:
        raise InputRejected("too_large", f"{format_bytes(size)} on disk, more than the {format_bytes(cap)} its header "
                                         "declares (header cap + pixel data)", path)


def _parse(f: BinaryIO, path: str, stop_before_pixels: bool, cap: int) -> pydicom.Dataset:
    """Parse the open file ``f``; pydicom's and zlib's own errors pass through (``_read`` maps them)."""
    defer = None if not stop_before_pixels else "4 KB"
    try:
        # the file meta first: a Deflated file must not reach pydicom's whole-file inflate
        preamble = pydicom.filereader.read_preamble(f, False)
        meta = pydicom.filereader._read_file_meta_info(f)
        if meta.get("TransferSyntaxUID") == DEFLATED:
            inner = _read_deflated(f, path, stop_before_pixels, cap, defer)
            ds = pydicom.dataset.FileDataset(path, inner, preamble, meta, False, True)
            ds.set_original_encoding(False, True, inner._character_set)
            return ds
        f.seek(0)
        ds = pydicom.dcmread(f, stop_before_pixels=stop_before_pixels, defer_size=defer)
    except InvalidDicomError:
        # old exports omit the preamble and file meta: accept a stream that starts with a
        # plausible group 0008 element, refuse anything else
        f.seek(0)
        if f.read(2) not in (b"\x08\x00", b"\x00\x08"):
            raise
        ds = _parse_without_meta(f, stop_before_pixels, defer)
    if not stop_before_pixels and "PixelData" in ds:
        _ = ds.PixelData  # force the read while the file is open
    return ds


def _parse_without_meta(f: BinaryIO, stop_before_pixels: bool, defer: str | None) -> pydicom.Dataset:
    """A stream with no preamble or file meta, from its start -> dataset with the transfer syntax it was read in."""
    f.seek(0)
    ds = pydicom.dcmread(f, stop_before_pixels=stop_before_pixels, defer_size=defer, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if implicit
            else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
        )
    return ds


def _read(path: str, stop_before_pixels: bool, limits: MemoryLimits | None = None,
          max_inflated_bytes: int | None = None) -> pydicom.Dataset:
    """Read one DICOM file through fileio (so failures can be injected), mapping errors to reasons.

    A header read (``stop_before_pixels``) inflates a Deflated file at most ``limits.header_bytes``; a full
    read at most ``max_inflated_bytes`` (from the declared pixel size, see ``read_headers``), and a full read
    of any file larger than that on disk is refused before it is read.
    """
    limits = limits or MemoryLimits()
    cap = limits.header_bytes if stop_before_pixels else (max_inflated_bytes or limits.budget_bytes)
    _check_size(path, stop_before_pixels, cap)
    try:
        with fileio.open_input(path) as f, quiet_pydicom():
            return _parse(f, path, stop_before_pixels, cap)
    except InputRejected:
        raise
    except PermissionError as exc:
        raise InputRejected("unreadable", f"PermissionError: {exc}", path) from exc
    except InvalidDicomError as exc:
        raise InputRejected("not_dicom", str(exc)[:200], path) from exc
    except (EOFError, struct.error) as exc:
        raise InputRejected("truncated", f"{type(exc).__name__}: {exc}"[:200], path) from exc
    except zlib.error as exc:
        raise InputRejected("truncated", f"deflate stream: {exc}"[:200], path) from exc
    except OSError as exc:
        raise InputRejected("unreadable", f"{type(exc).__name__}: {exc}"[:200], path) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise InputRejected("not_dicom", f"{type(exc).__name__}: {exc}"[:200], path) from exc


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


@dataclass(frozen=True)
class Screening:
    """Which images the build refuses by default (DICOM PS3.15 wants clean pixel data or exclusion): any SOP
    class but CT Image Storage and Enhanced CT Image Storage, BurnedInAnnotation YES, ImageType DERIVED or
    SECONDARY. Each ``allow_*`` lets that kind through (CLI ``--allow-...``); an absent BurnedInAnnotation
    is normal (most CT omits it) and builds."""

    allow_non_ct_sop_class: bool = False
    allow_burned_in_annotation: bool = False
    allow_derived: bool = False


def _values(ds: pydicom.Dataset, kw: str) -> list[str]:
    value = ds.get(kw, None)
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)):
        value = [value]
    return [str(v).strip().upper() for v in value]


def screen(ds: pydicom.Dataset, path: str, screening: Screening) -> None:
    """Raise InputRejected when the header of one image file fails ``screening`` (the detail names the option)."""
    sop = _sop_class(ds)
    if sop not in CT_SOP_CLASSES and not screening.allow_non_ct_sop_class:
        name = pydicom.uid.UID(sop).name if sop else "missing"
        raise InputRejected("non_ct_sop_class", f"SOP class {sop or '-'} ({name}); allow with --allow-non-ct-sop-class", path)
    burned = _values(ds, "BurnedInAnnotation")
    if burned[:1] == ["YES"] and not screening.allow_burned_in_annotation:
        raise InputRejected("burned_in_annotation", "BurnedInAnnotation is YES; allow with --allow-burned-in-annotation", path)
    image_type = _values(ds, "ImageType")
    if not screening.allow_derived and (image_type[:1] == ["DERIVED"] or image_type[1:2] == ["SECONDARY"]):
        raise InputRejected("derived_image", f"ImageType {'/'.join(image_type[:2])}; allow with --allow-derived", path)


def face_bearing(ds: pydicom.Dataset) -> str:
    """Why the scan of this header may show a face ('' when nothing says so): body part, descriptions,
    RecognizableVisualFeatures. Goes to the private linkage report only (it quotes header values)."""
    if _values(ds, "RecognizableVisualFeatures")[:1] == ["YES"]:
        return "RecognizableVisualFeatures YES"
    part = (_values(ds, "BodyPartExamined") or [""])[0].replace(" ", "")
    if part in _FACE_BODY_PARTS:
        return f"BodyPartExamined {part}"
    for kw in ("StudyDescription", "SeriesDescription", "ProtocolName"):
        text = " ".join(_values(ds, kw))
        word = next((w for w in _FACE_WORDS if w in text), None)
        if word:
            return f"{kw} mentions {word}"
    return ""


@dataclass
class SeriesHeaders:
    """What every file of a series declares, read before any pixel is decoded. ``pixel_bytes`` per file
    (rows x columns x frames x samples x bytes per sample); ``face_bearing``: the first reason found."""

    voxels: int = 0
    stored_itemsize: int = 1
    pixel_bytes: dict[str, int] = field(default_factory=dict)
    dims: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # path -> (rows, columns, frames)
    face_bearing: str = ""


def read_headers(files: list[str], limits: MemoryLimits | None = None, screening: Screening | None = None,
                 source: str | None = None) -> SeriesHeaders:
    """Header of every file -> declared sizes; screens each file (when ``screening`` is given) and checks the
    memory the whole series needs against ``limits`` before anything is decoded (a tiny file may declare a
    huge image, and not only the first file may)."""
    limits = limits or MemoryLimits()
    source = source or (os.path.commonpath(files) if len(files) > 1 else files[0])
    out = SeriesHeaders()
    with quiet_pydicom():
        for path in files:
            ds = _read(path, stop_before_pixels=True, limits=limits)
            if screening is not None:
                screen(ds, path, screening)
            rows, cols = _int(ds.get("Rows", 0), 0), _int(ds.get("Columns", 0), 0)
            frames = max(_int(ds.get("NumberOfFrames", 1), 1), 1)
            samples = max(_int(ds.get("SamplesPerPixel", 1), 1), 1)
            bits = _int(ds.get("BitsAllocated", 16), 16)
            if rows < 1 or cols < 1 or not 1 <= bits <= 64:
                raise InputRejected("pixel_decode_failed", f"Rows {rows}, Columns {cols}, BitsAllocated {bits}", path)
            itemsize = (bits + 7) // 8
            out.pixel_bytes[path] = rows * cols * frames * samples * itemsize
            out.dims[path] = (rows, cols, frames)
            out.voxels += rows * cols * frames
            out.stored_itemsize = max(out.stored_itemsize, itemsize * samples)
            limits.check_bytes(out.pixel_bytes[path], f"pixel data of {rows}x{cols}x{frames}x{samples}", path)
            if not out.face_bearing:
                out.face_bearing = face_bearing(ds)
    # a multi-frame file holds its encoded bytes, the PixelData value and the decoded frames at once
    copies = 3 if len(files) == 1 and out.dims[files[0]][2] > 1 else 1
    sizes = {(r, c) for r, c, _ in out.dims.values()}
    frames = sum(f for _, _, f in out.dims.values())
    if len(sizes) == 1:  # (D, H, W) when the files agree
        limits.check_source((frames, *sizes.pop()), out.stored_itemsize * copies, source)
    else:  # name the file that declares the most
        largest = max(out.pixel_bytes, key=out.pixel_bytes.__getitem__)
        limits.check_source((out.voxels,), out.stored_itemsize * copies, largest)
    return out


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


_J2K_SYNTAXES = set(pydicom.uid.JPEG2000TransferSyntaxes)
_JPEG_SYNTAXES = set(pydicom.uid.JPEGTransferSyntaxes) | set(pydicom.uid.JPEGLSTransferSyntaxes)


def _codestream_size(frame: bytes, j2k: bool) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG 2000 SIZ or JPEG / JPEG-LS SOF marker declares; None if unparsable."""
    if j2k:
        off = 0
        if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # JP2 boxes before the codestream
            off = frame.find(b"\xff\x4f\xff\x51")
            if off < 0:
                return None
        if frame[off:off + 4] != b"\xff\x4f\xff\x51" or len(frame) < off + 42:
            return None
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[off + 8:off + 24])
        return ysiz - yo, xsiz - xo, struct.unpack(">H", frame[off + 40:off + 42])[0]
    info = pydicom.pixels.utils._get_jpg_parameters(frame)
    return (info["height"], info["width"], info["components"]) if "height" in info else None


def check_codestreams(ds: pydicom.Dataset, path: str) -> None:
    """Every compressed frame must declare the Rows x Columns x SamplesPerPixel of the header (already checked
    against the caps): a JPEG 2000 / JPEG decoder allocates what its codestream says, before any check of ours."""
    ts = ds.file_meta.get("TransferSyntaxUID", None)
    if ts not in _J2K_SYNTAXES and ts not in _JPEG_SYNTAXES or "PixelData" not in ds:
        return
    want = (_int(ds.get("Rows", 0), 0), _int(ds.get("Columns", 0), 0), _int(ds.get("SamplesPerPixel", 1), 1))
    frames = max(_int(ds.get("NumberOfFrames", 1), 1), 1)
    try:
        for i, frame in enumerate(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=frames)):
            got = _codestream_size(frame[:1 << 16], ts in _J2K_SYNTAXES)
            if got is not None and got != want:
                raise InputRejected("pixel_decode_failed", f"frame {i}: codestream declares {got[0]}x{got[1]}x{got[2]}"
                                    f", the header {want[0]}x{want[1]}x{want[2]}: not decoded", path)
    except InputRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken encapsulation is the decoder's to report
        raise InputRejected("pixel_decode_failed", f"encapsulated pixel data: {type(exc).__name__}: {exc}"[:300], path) from exc


def _full_read(path: str, headers: SeriesHeaders, limits: MemoryLimits) -> pydicom.Dataset:
    ds = _read(path, stop_before_pixels=False, limits=limits,
               max_inflated_bytes=limits.max_inflated_bytes(headers.pixel_bytes[path]))
    rows, cols, frames = headers.dims[path]
    if (_int(ds.get("Rows", 0), 0), _int(ds.get("Columns", 0), 0), max(_int(ds.get("NumberOfFrames", 1), 1), 1)) != \
            (rows, cols, frames):
        raise InputRejected("pixel_decode_failed", "Rows/Columns/NumberOfFrames changed since the header was read", path)
    check_codestreams(ds, path)
    return ds


def _check_decoded(pix: np.ndarray, declared: tuple[int, int, int], path: str) -> None:
    """The decoder's array must have the declared size (a codestream may say otherwise than Rows/Columns)."""
    rows, cols, frames = declared
    if pix.shape[-2:] != (rows, cols) or (pix.ndim == 3 and pix.shape[0] != frames):
        raise InputRejected("pixel_decode_failed", f"decoded {pix.shape}, header declares {frames}x{rows}x{cols}", path)


def _classic_slices(files: list[str], headers: SeriesHeaders, limits: MemoryLimits) -> list[_Slice]:
    slices = []
    for path in files:
        ds = _full_read(path, headers, limits)
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if kw not in ds or ds[kw].value in (None, ""):
                raise InputRejected("missing_geometry", f"no {kw}", path)
        pix = _pixels(ds, path)
        if pix.ndim != 2:
            raise InputRejected("not_3d", f"pixel array of shape {pix.shape} in a single-frame series", path)
        _check_decoded(pix, headers.dims[path], path)
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


def _enhanced_slices(path: str, headers: SeriesHeaders, limits: MemoryLimits) -> list[_Slice]:
    ds = _full_read(path, headers, limits)
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
    _check_decoded(pix, headers.dims[path], path)
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
    files: list[str], tol: StackTolerances | None = None, multiframe: bool | None = None,
    limits: MemoryLimits | None = None, screening: Screening | None = None, headers: SeriesHeaders | None = None,
) -> Volume:
    """Read and assemble one series (all files of one SeriesInstanceUID) -> float32 HU Volume.

    Every file's header is read, screened (when ``screening`` is given: the builder always passes its own)
    and checked against ``limits`` before any pixel is decoded (``read_headers``; pass its result as
    ``headers`` when already read). The volume is in scanner order; pass it through
    ``geometry.canonicalize`` for the stored orientation. Raises InputRejected with a named reason.
    """
    limits = limits or MemoryLimits()
    source = os.path.commonpath(files) if len(files) > 1 else files[0]
    if headers is None:
        headers = read_headers(files, limits, screening, source)
    with quiet_pydicom():
        return _load_series(files, tol or StackTolerances(), multiframe, limits, headers, source)


def _load_series(files: list[str], tol: StackTolerances, multiframe: bool | None, limits: MemoryLimits,
                 headers: SeriesHeaders, source: str) -> Volume:
    if multiframe is None:
        ds = _read(files[0], stop_before_pixels=True, limits=limits)
        frames = _int(ds.get("NumberOfFrames", 1), 1)
        multiframe = len(files) == 1 and (frames > 1 or _sop_class(ds) == ENHANCED_CT_IMAGE_STORAGE)
    if multiframe:
        if len(files) != 1:
            raise InputRejected("enhanced_multiframe_unsupported", f"{len(files)} multi-frame files in one series", source)
        slices = _enhanced_slices(files[0], headers, limits)
    else:
        slices = _classic_slices(files, headers, limits)
    return assemble(slices, tol, source)


def list_files(root: Path) -> list[str]:
    """Every regular file under ``root`` (sorted, symlinks to folders not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            out.append(os.path.join(dirpath, name))
    return out
