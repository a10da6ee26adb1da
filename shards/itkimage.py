"""MetaImage (.mha, .mhd + data file) and NRRD (.nrrd, .nhdr + data file) -> float32 HU :class:`Volume`.

The pixels are read by SimpleITK (ITK's MetaImageIO / NrrdImageIO, forced by suffix so that a file is
never handed to another reader). Before ITK sees a file the header is screened here:

* the header text is bounded (``HEADER_MAX_BYTES``) and parsed for the fields that decide where the
  bytes come from: a detached data file must be a relative path without ``..`` that resolves inside
  the header's own folder (never an absolute path, never a link leading out of it); file lists and
  file-name patterns (``LIST``, ``%03d``) are refused;
* the element type must be a known scalar type (a named reject otherwise);
* ITK's ``ReadImageInformation`` (header only, no pixel buffer) gives the size, checked against
  ``max_voxels`` before any allocation; uncompressed data must hold every declared byte, and a compressed
  stream must inflate to every one (checked 1 MiB at a time: ITK would leave the rest of its buffer uninitialised).

Output contract: ``array`` is ``(D, H, W)`` = ``(k, j, i)`` ITK order, ``spacing`` ``(sx, sy, sz)`` mm,
``origin`` and ``direction`` in LPS (ITK's own frame; NRRD ``space`` fields are converted by ITK), not
yet canonical. Values are taken as stored; MetaImage's ``ElementToIntensityFunctionSlope/Offset``
(which ITK ignores) are applied when present. NRRD carries no rescale.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mim_scale.shards import fileio
from mim_scale.shards.dicom import MAX_SPACING_MM
from mim_scale.shards.geometry import Volume
from mim_scale.shards.rejects import InputRejected

HEADER_MAX_BYTES = 1 << 16  # real headers are < 2 KiB; anything longer is not read as a header

METAIMAGE_SUFFIXES = (".mha", ".mhd")
NRRD_SUFFIXES = (".nrrd", ".nhdr")

# MetaImage element types (MetaIO names) the reader takes, -> bytes per element
METAIMAGE_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
# NRRD "type:" spellings (teem's list) -> bytes per element
_NRRD_TYPE_GROUPS = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
        "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
NRRD_TYPES = {name: size for size, names in _NRRD_TYPE_GROUPS.items() for name in names}

_MHA_LINE = re.compile(r"^\s*([^=\s][^=]*?)\s*=\s*(.*?)\s*$")  # MetaIO: "Key = Value"; ITK writes keys like dim[0]
_TRUNCATION_WORDS = ("not read completely", "fread got only", "but received", "unexpected end", "premature", "EOF")


def image_kind(path: str | Path) -> str | None:
    """``"metaimage"`` / ``"nrrd"`` by suffix (case-insensitive), else None."""
    name = str(path).lower()
    if name.endswith(METAIMAGE_SUFFIXES):
        return "metaimage"
    if name.endswith(NRRD_SUFFIXES):
        return "nrrd"
    return None


@dataclass(frozen=True)
class Header:
    """What the screen needs from a header. ``data_path`` is None when the data follows the header in
    the same file (then ``data_offset`` is the header's byte length); ``raw`` is True when the data is
    stored uncompressed and in binary, so its byte count can be checked before reading."""

    path: str
    kind: str
    element_bytes: int
    data_path: str | None
    data_offset: int  # bytes to skip in the data file; -1 = the data is at the file's end
    raw: bool
    compressed_bytes: int | None = None  # MetaImage CompressedDataSize, when given
    slope: float = 1.0
    intercept: float = 0.0
    encoding: str = "raw"  # how the voxel bytes are stored: raw, zlib (MetaImage), gzip, bzip2, text, hex


def _bounded_header_text(path: str) -> bytes:
    try:
        with fileio.open_input(path) as f:
            head = f.read(HEADER_MAX_BYTES + 1)
    except OSError as exc:
        raise InputRejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}", path) from exc
    if not head:
        raise InputRejected("empty_file", "0 bytes", path)
    return head


def _safe_data_path(header_path: str, name: str) -> str:
    """Resolve a detached data file name; it must stay inside the header's folder."""
    if not name:
        raise InputRejected("bad_header", "empty data file name", header_path)
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise InputRejected("unsafe_data_file", f"data file {name!r} is an absolute path (must sit beside its header)", header_path)
    if ".." in re.split(r"[\\/]", name):
        raise InputRejected("unsafe_data_file", f"data file {name!r} climbs out with '..' (must sit beside its header)", header_path)
    folder = Path(header_path).resolve().parent
    target = (folder / name).resolve()
    if folder not in target.parents:
        raise InputRejected("unsafe_data_file", f"data file {name!r} resolves outside the header's folder (a link?)", header_path)
    if not target.is_file():
        raise InputRejected("missing_data_file", f"data file {name!r} named by the header is absent", header_path)
    return str(target)


def _number(value: str, what: str, path: str) -> float:
    try:
        out = float(value)
    except ValueError as exc:
        raise InputRejected("bad_header", f"{what} {value!r} is not a number", path) from exc
    if not np.isfinite(out):
        raise InputRejected("bad_header", f"{what} {value!r} is not finite", path)
    return out


def _metaimage_header(path: str, head: bytes) -> Header:
    fields: dict[str, str] = {}
    offset = 0
    data_file = None
    for raw_line in head.split(b"\n"):
        end = offset + len(raw_line) + 1
        if end > HEADER_MAX_BYTES + 1:
            break
        line = raw_line.decode("latin-1").rstrip("\r")
        offset = end
        if not line.strip():
            continue
        m = _MHA_LINE.match(line)
        if not m:
            raise InputRejected("bad_header", f"not a MetaImage header line at byte {offset - len(raw_line) - 1}", path)
        key, value = m.group(1).lower(), m.group(2)
        fields[key] = value
        if key == "elementdatafile":  # MetaIO: always the last field; the data (LOCAL) follows it
            data_file = value
            break
    if data_file is None:
        raise InputRejected("bad_header", f"no ElementDataFile field in the first {HEADER_MAX_BYTES} bytes", path)
    if fields.get("objecttype", "Image").lower() != "image":
        raise InputRejected("unsupported_format", f"MetaImage ObjectType {fields['objecttype']!r} (expected Image)", path)
    etype = fields.get("elementtype", "")
    if etype.upper() not in METAIMAGE_TYPES:
        raise InputRejected("unsupported_data_type", f"ElementType {etype!r}; supported: {', '.join(METAIMAGE_TYPES)}", path)
    channels = fields.get("elementnumberofchannels", "1")
    if channels.strip() != "1":
        raise InputRejected("unsupported_data_type", f"ElementNumberOfChannels {channels!r} (a CT has one)", path)
    binary = fields.get("binarydata", "True").lower() in ("true", "1")
    compressed = fields.get("compresseddata", "False").lower() in ("true", "1")
    slope = _number(fields.get("elementtointensityfunctionslope", "1"), "ElementToIntensityFunctionSlope", path)
    intercept = _number(fields.get("elementtointensityfunctionoffset", "0"), "ElementToIntensityFunctionOffset", path)
    if slope == 0.0:
        raise InputRejected("bad_header", "ElementToIntensityFunctionSlope is 0", path)
    csize = int(_number(fields["compresseddatasize"], "CompressedDataSize", path)) if "compresseddatasize" in fields else None
    if data_file.upper() == "LOCAL":
        data_path, skip = None, offset
    else:
        if data_file.upper().startswith("LIST") or "%" in data_file:
            raise InputRejected("unsupported_format", f"ElementDataFile {data_file!r}: a list or pattern of files (one data file per volume is supported)", path)
        data_path = _safe_data_path(path, data_file)
        skip = int(_number(fields.get("headersize", "0"), "HeaderSize", path))
        if skip < -1:
            raise InputRejected("bad_header", f"HeaderSize {skip}", path)
    encoding = "zlib" if compressed else ("raw" if binary else "text")
    return Header(path, "metaimage", METAIMAGE_TYPES[etype.upper()], data_path, skip, binary and not compressed, csize, slope,
                  intercept, encoding)


def _nrrd_header(path: str, head: bytes) -> Header:
    if not head.startswith(b"NRRD000"):
        raise InputRejected("bad_header", "no NRRD000x magic on the first line", path)
    fields: dict[str, str] = {}
    offset = 0
    ended = False
    lines = head.split(b"\n")
    for i, raw_line in enumerate(lines):
        end = offset + len(raw_line) + 1
        if end > HEADER_MAX_BYTES + 1 or (i == len(lines) - 1 and len(head) > HEADER_MAX_BYTES):
            break  # a line cut by the bound
        offset = end
        line = raw_line.decode("latin-1").rstrip("\r")
        if i == 0 or line.startswith("#"):
            continue
        if not line.strip():
            ended = True
            break
        if ":=" in line:  # key/value pairs: free text, not fields
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            raise InputRejected("bad_header", f"not a NRRD field line at byte {offset - len(raw_line) - 1}", path)
        fields[key.strip().lower().replace(" ", "")] = value.strip()
    else:
        ended = len(head) <= HEADER_MAX_BYTES  # a detached header may end at the end of the file
    if not ended:
        raise InputRejected("bad_header", f"no end of the NRRD header in the first {HEADER_MAX_BYTES} bytes", path)
    ntype = fields.get("type", "")
    if ntype.lower() not in NRRD_TYPES:
        raise InputRejected("unsupported_data_type", f"NRRD type {ntype!r}; supported: the integer and float scalar types", path)
    encoding = fields.get("encoding", "").lower()
    if encoding not in ("raw", "gzip", "gz", "bzip2", "bz2", "ascii", "text", "txt", "hex"):
        raise InputRejected("bad_header", f"NRRD encoding {encoding!r}", path)
    if "linesskip" in fields or "lineskip" in fields:
        raise InputRejected("unsupported_format", "NRRD 'line skip' is not supported", path)
    skip = int(_number(fields.get("byteskip", "0"), "byte skip", path))
    if skip < -1:
        raise InputRejected("bad_header", f"byte skip {skip}", path)
    data_file = fields.get("datafile")
    if data_file is None:
        if path.lower().endswith(".nhdr"):
            raise InputRejected("bad_header", "detached NRRD header (.nhdr) names no data file", path)
        data_path, skip = None, (-1 if skip == -1 else offset + skip)
    else:
        if data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) > 1:
            raise InputRejected("unsupported_format", f"NRRD data file {data_file!r}: a list or pattern of files (one data file per volume is supported)", path)
        data_path = _safe_data_path(path, data_file)
    canonical = {"gz": "gzip", "bz2": "bzip2", "ascii": "text", "txt": "text"}.get(encoding, encoding)
    return Header(path, "nrrd", NRRD_TYPES[ntype.lower()], data_path, skip, encoding == "raw", encoding=canonical)


def read_header(path: str) -> Header:
    """Screen a MetaImage / NRRD header (see module doc); raises InputRejected with a named reason."""
    kind = image_kind(path)
    if kind is None:
        raise InputRejected("unsupported_format", "not a .mha/.mhd/.nrrd/.nhdr file", path)
    head = _bounded_header_text(path)
    return _metaimage_header(path, head) if kind == "metaimage" else _nrrd_header(path, head)


def data_file_of(path: str) -> str | None:
    """The detached data file a header names (resolved, even where it is unsafe or absent), or None.

    Used by discovery so that a ``.raw`` beside its ``.mhd`` is not reported as a file of its own; only the
    data file field is looked at, so a header that is bad for another reason still claims its data file
    (it is rejected once, by the worker, with its reason). The file is never read here."""
    try:
        head = _bounded_header_text(path)
    except InputRejected:
        return None
    if image_kind(path) == "metaimage":
        m = re.search(rb"(?mi)^[ \t]*ElementDataFile[ \t]*=[ \t]*(.*?)[ \t\r]*$", head)
    else:
        m = re.search(rb"(?mi)^data ?file:[ \t]*(.*?)[ \t\r]*$", head.split(b"\n\n", 1)[0])
    if m is None:
        return None
    name = m.group(1).decode("latin-1")
    if not name or name.upper() in ("LOCAL",) or name.upper().startswith("LIST") or "%" in name:
        return None
    return os.path.realpath(os.path.join(os.path.dirname(path), name))


def _itk_error(exc: Exception, path: str) -> InputRejected:
    msg = str(exc)
    tail = msg.strip().splitlines()[-1] if msg.strip() else type(exc).__name__
    if any(w.lower() in msg.lower() for w in _TRUNCATION_WORDS):
        return InputRejected("truncated", f"ITK: {tail}"[:300], path)
    return InputRejected("read_failed", f"ITK: {tail}"[:300], path)


def _declared_size(reader: Any, hdr: Header, path: str, max_voxels: int, limits: Any) -> tuple[int, int, int]:
    """ITK's reading of the header alone (no pixel buffer yet) -> size (x, y, z), checked: one component, 3-D,
    at most ``max_voxels``, within ``limits``, and the declared bytes present (``_check_bytes``)."""
    try:
        reader.ReadImageInformation()  # header only: no pixel buffer yet
    except RuntimeError as exc:
        msg = str(exc)
        if "PixelType" in msg or "pixel type" in msg.lower() or "component" in msg.lower():
            raise InputRejected("unsupported_data_type", f"ITK: {msg.strip().splitlines()[-1]}"[:300], path) from exc
        raise InputRejected("bad_header", f"ITK: {msg.strip().splitlines()[-1] if msg.strip() else 'unreadable header'}"[:300], path) from exc
    size = tuple(int(s) for s in reader.GetSize())
    if reader.GetNumberOfComponents() != 1:
        raise InputRejected("unsupported_data_type", f"{reader.GetNumberOfComponents()} components per voxel (a CT has one)", path)
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) != 3 or min(size) < 2:
        raise InputRejected("not_3d", f"size {tuple(reader.GetSize())}", path)
    voxels = math.prod(size)  # Python ints: a hostile size cannot wrap around
    if voxels > max_voxels:
        raise InputRejected("too_large", f"size {size} exceeds {max_voxels} voxels", path)
    if limits is not None:
        limits.check_source(size[::-1], hdr.element_bytes, path)
    _check_bytes(hdr, voxels)
    return size  # type: ignore[return-value]


def _check_geometry(spacing: np.ndarray, origin: np.ndarray, direction: np.ndarray, path: str) -> None:
    """spacing (3,) mm, origin (3,) mm, direction (3, 3): finite, plausible voxel sizes, orthonormal columns."""
    if not np.all(np.isfinite(spacing)) or not np.all(spacing > 1e-4) or np.any(spacing > MAX_SPACING_MM):
        raise InputRejected("absurd_spacing", f"voxel sizes {spacing.round(4).tolist()} mm", path)
    if not np.all(np.isfinite(origin)) or not np.all(np.isfinite(direction)):
        raise InputRejected("sheared_affine", "origin or direction is not finite", path)
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > 1e-3:
        raise InputRejected("sheared_affine", "direction columns are not orthonormal (shear or scaling)", path)


def load_itk(path: str, max_voxels: int = 1 << 30, limits: Any = None) -> Volume:
    """Read one MetaImage / NRRD volume (see module doc); raises InputRejected with a named reason.

    The declared size is checked before any pixel buffer exists: against ``max_voxels`` and, when given,
    ``limits.check_source(shape, stored_itemsize, path)`` (the byte caps of ``shards.limits.MemoryLimits``)."""
    import SimpleITK as sitk

    hdr = read_header(path)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warnings quote file paths; logs must not
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.SetImageIO("MetaImageIO" if hdr.kind == "metaimage" else "NrrdImageIO")
    reader.SetNumberOfThreads(1)  # one build task = one core
    size = _declared_size(reader, hdr, path, max_voxels, limits)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise _itk_error(exc, path) from exc
    arr = sitk.GetArrayViewFromImage(img)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputRejected("unsupported_data_type", f"pixel type {img.GetPixelIDTypeAsString()}", path)
    # always a copy (np.array, not np.asarray: a float32 view would alias the ITK buffer freed below)
    data = np.array(arr, dtype=np.float32, copy=True).reshape(size[::-1])
    spacing = np.asarray(img.GetSpacing()[:3], dtype=np.float64)
    origin = np.asarray(img.GetOrigin()[:3], dtype=np.float64)
    ndim = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)[:3, :3]
    del img, arr
    if hdr.slope != 1.0 or hdr.intercept != 0.0:
        data *= np.float32(hdr.slope)
        data += np.float32(hdr.intercept)
    if not np.all(np.isfinite(data)):
        raise InputRejected("non_finite_values", f"{int((~np.isfinite(data)).sum())} NaN/Inf voxels", path)
    _check_geometry(spacing, origin, direction, path)
    return Volume(np.ascontiguousarray(data), tuple(spacing), tuple(origin), direction)


def _check_bytes(hdr: Header, voxels: int) -> None:
    """Uncompressed data must hold every declared byte; compressed MetaImage its CompressedDataSize."""
    data_path = hdr.data_path or hdr.path
    try:
        have = os.path.getsize(data_path)
    except OSError as exc:
        raise InputRejected("unreadable", f"data file: {type(exc).__name__}: {exc.strerror or exc}", hdr.path) from exc
    if hdr.raw:
        need = voxels * hdr.element_bytes
        avail = have if hdr.data_offset == -1 else have - hdr.data_offset
        if avail < need:
            raise InputRejected("truncated", f"the data holds {max(avail, 0)} bytes, the header declares {need} "
                                f"({voxels} voxels x {hdr.element_bytes} bytes)", hdr.path)
    elif hdr.compressed_bytes is not None:
        avail = have - max(hdr.data_offset, 0)
        if avail < hdr.compressed_bytes:
            raise InputRejected("truncated", f"the data holds {avail} bytes, CompressedDataSize declares {hdr.compressed_bytes}", hdr.path)
    if hdr.encoding in ("zlib", "gzip", "bzip2"):
        _check_inflated(hdr, data_path, voxels * hdr.element_bytes)


def _check_inflated(hdr: Header, data_path: str, need: int) -> None:
    """A compressed stream must inflate to every declared byte: ITK fills what the stream holds and leaves the
    rest of its buffer as it found it (process memory would become voxels). Inflated here first, 1 MiB at a time
    and discarded, stopping one byte past ``need`` (a bomb costs no memory)."""
    import bz2
    import zlib

    if hdr.data_offset == -1:  # "the data is at the file's end" needs the stored size: only raw data has one
        raise InputRejected("unsupported_format", f"{hdr.encoding} data with a header/byte skip of -1", hdr.path)
    piece = 1 << 20
    inflater: Any = bz2.BZ2Decompressor() if hdr.encoding == "bzip2" else zlib.decompressobj(zlib.MAX_WBITS | 32)
    total = 0
    try:
        with fileio.open_input(data_path) as f:
            f.seek(hdr.data_offset)
            while total <= need and not inflater.eof:
                chunk = f.read(piece)
                if not chunk:
                    break
                total += len(inflater.decompress(chunk, piece))
                while total <= need and not inflater.eof and _pending(inflater):
                    total += len(inflater.decompress(inflater.unconsumed_tail if hdr.encoding != "bzip2" else b"", piece))
    except (OSError, EOFError, zlib.error) as exc:
        raise InputRejected("pixel_decode_failed", f"{hdr.encoding} stream: {type(exc).__name__}: {exc}"[:300], hdr.path) from exc
    if total < need:
        raise InputRejected("truncated", f"the {hdr.encoding} data inflates to {total} bytes, the header declares {need} "
                            f"({need // hdr.element_bytes} voxels x {hdr.element_bytes} bytes)", hdr.path)


def _pending(inflater: Any) -> bool:
    """More output waits inside the inflater without new input (zlib: an unconsumed tail; bz2: no input needed)."""
    if hasattr(inflater, "unconsumed_tail"):
        return bool(inflater.unconsumed_tail)
    return not inflater.needs_input
