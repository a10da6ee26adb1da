"""NIfTI (.nii, .nii.gz) volumes -> float32 HU :class:`Volume` in ITK order (not yet canonical).

The header is checked field by field before any voxel is read (``check_header``): magic, dims and data
type, the memory the data needs (``limits``), ``vox_offset``, voxel sizes, the qform/sform codes and
their affines (finite, non-degenerate, unsheared, agreeing with each other and with pixdim), units and
scaling. Then only the declared bytes are read (a gzip stream is inflated no further) and the voxels
are taken straight from them: the file's (i, j, k) Fortran order is the (k, j, i) C order of our
arrays. The NIfTI affine maps (i, j, k) to RAS; the volume is converted to LPS. Values are taken as
stored after scl_slope/scl_inter (NIfTI CT is stored in HU; slope 0 or NaN means unscaled).
"""

from __future__ import annotations

import gzip
import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from mim_scale.shards import fileio
from mim_scale.shards.dicom import MAX_SPACING_MM
from mim_scale.shards.geometry import Volume
from mim_scale.shards.limits import MemoryLimits
from mim_scale.shards.rejects import InputRejected

MIN_SPACING_MM = 1e-4
# qform and sform must describe the same grid: direction cosines, voxel sizes (relative) and origin (mm)
_XFORM_DIRECTION_ATOL = 1e-3
_XFORM_SPACING_RTOL = 1e-3
_XFORM_ORIGIN_ATOL_MM = 0.1
# pixdim against the column norms of the affine used (writers round pixdim and the sform separately)
_PIXDIM_RTOL = 1e-2
_SHEAR_ATOL = 1e-3
# NIFTI_XFORM_UNKNOWN .. NIFTI_XFORM_TEMPLATE_OTHER
_XFORM_CODES = range(0, 6)
# spatial unit code (xyzt_units & 7) -> mm per unit; 0 = unknown, read as mm (as every CT converter writes)
_MM_PER_UNIT = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 1e-3}


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


@dataclass(frozen=True)
class NiftiLayout:
    """What a checked header says about the data. shape_ijk: (I, J, K) voxels; dtype: stored samples
    (with the file's byte order); offset: bytes before the data; slope/inter: None when unscaled;
    affine_ras: 4x4 in mm."""

    shape_ijk: tuple[int, int, int]
    dtype: np.dtype
    offset: int
    slope: float | None
    inter: float | None
    affine_ras: np.ndarray


def _bad(field: str, detail: str, path: str, reason: str = "invalid_header") -> InputRejected:
    return InputRejected(reason, f"{field}: {detail}", path)


def _xform_parts(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4x4 -> (column norms = voxel sizes, unit direction columns, origin)."""
    m = affine[:3, :3].astype(np.float64)
    spacing = np.linalg.norm(m, axis=0)
    return spacing, m / np.where(spacing > 0, spacing, 1.0), affine[:3, 3].astype(np.float64)


def _check_affine(affine: np.ndarray, which: str, path: str) -> None:
    if not np.all(np.isfinite(affine)):
        raise _bad(which, "not finite", path, "sheared_affine")
    spacing, direction, _ = _xform_parts(affine)
    if not np.all(spacing > MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise _bad(which, f"voxel sizes {spacing.round(4).tolist()} mm", path, "absurd_spacing")
    if abs(np.linalg.det(direction)) < 0.5 or np.max(np.abs(direction.T @ direction - np.eye(3))) > _SHEAR_ATOL:
        raise _bad(which, "columns are not orthogonal (shear, tilt or a singular matrix)", path, "sheared_affine")


def _check_container(header: nib.Nifti1Header, path: str) -> tuple[list[int], np.dtype]:
    """magic, dim, datatype, bitpix -> (shape as (I, J, K) after dropping trailing 1s, stored dtype)."""
    nifti2 = isinstance(header, nib.Nifti2Header)
    magic = bytes(header["magic"]).rstrip(b"\0")
    if magic != (b"n+2" if nifti2 else b"n+1"):
        raise _bad("magic", f"{magic!r} (a single-file NIfTI says 'n+1' / 'n+2'; .hdr/.img pairs are not read)", path)
    dim = [int(v) for v in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise _bad("dim[0]", f"{dim[0]} (must be 1..7)", path)
    shape = dim[1:dim[0] + 1]
    if any(n < 1 for n in shape):
        raise _bad("dim", f"{shape} (every dimension must be >= 1)", path)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 2:
        raise InputRejected("not_3d", f"data shape {tuple(shape)}", path)
    try:
        dtype = header.get_data_dtype()
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for unknown codes
        raise _bad("datatype", f"code {int(header['datatype'])} is unknown ({type(exc).__name__})", path) from exc
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise _bad("datatype", f"{dtype} (code {int(header['datatype'])}) is not a real scalar type", path)
    if int(header["bitpix"]) != 8 * dtype.itemsize:
        raise _bad("bitpix", f"{int(header['bitpix'])} for a {dtype.itemsize}-byte {dtype}", path)
    return shape, dtype


def _check_vox_offset(header: nib.Nifti1Header, data_bytes: int, path: str, limits: MemoryLimits,
                      file_size: int | None) -> int:
    """vox_offset -> bytes before the data; the file (when its size is known) must hold offset + data_bytes."""
    offset_f = float(header["vox_offset"])
    min_offset = int(header["sizeof_hdr"]) + 4
    if not math.isfinite(offset_f) or offset_f != int(offset_f) or not min_offset <= offset_f <= limits.header_bytes:
        raise _bad("vox_offset", f"{offset_f} (must be an integer from {min_offset} to {limits.header_bytes})", path)
    offset = int(offset_f)
    if file_size is not None and offset + data_bytes > file_size:
        raise InputRejected("truncated", f"{file_size} bytes, header declares {offset + data_bytes}", path)
    return offset


def _checked_xforms(header: nib.Nifti1Header, qfac: float, path: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """qform/sform codes, the quaternion (with ``qfac`` = pixdim[0]) and each affine set -> (qform, sform),
    None where its code is 0; at least one is set."""
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode not in _XFORM_CODES or scode not in _XFORM_CODES:
        raise _bad("qform_code/sform_code", f"{qcode}/{scode} (must be 0..5)", path, "missing_orientation")
    if qcode == 0 and scode == 0:
        raise _bad("qform_code/sform_code", "both 0: the header gives no patient orientation", path, "missing_orientation")
    qform = sform = None
    if qcode > 0:
        if qfac not in (-1.0, 0.0, 1.0):
            raise _bad("pixdim[0]", f"qfac {qfac} (must be -1 or 1)", path)
        quat = np.asarray([header["quatern_b"], header["quatern_c"], header["quatern_d"]], dtype=np.float64)
        offs = np.asarray([header["qoffset_x"], header["qoffset_y"], header["qoffset_z"]], dtype=np.float64)
        if not np.all(np.isfinite(quat)) or not np.all(np.isfinite(offs)) or float(quat @ quat) > 1.0 + 1e-5:
            raise _bad("quatern_b/c/d, qoffset", f"{quat.tolist()} / {offs.tolist()} is not a rotation and offset", path)
        qform = header.get_qform()
        _check_affine(qform, "qform", path)
    if scode > 0:
        sform = header.get_sform()
        _check_affine(sform, "sform", path)
    return qform, sform


def _check_geometry(header: nib.Nifti1Header, path: str) -> np.ndarray:
    """pixdim, codes, quaternion, affines (agreeing with each other and with pixdim), units -> 4x4 RAS
    affine in mm (the sform when set, else the qform)."""
    pixdim = np.asarray(header["pixdim"][:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim[1:4])) or not np.all(pixdim[1:4] > 0):
        raise _bad("pixdim[1:4]", f"voxel sizes {pixdim[1:4].tolist()} must be finite and positive", path, "absurd_spacing")
    qform, sform = _checked_xforms(header, pixdim[0], path)
    if qform is not None and sform is not None:
        (qs, qd, qo), (ss, sd, so) = _xform_parts(qform), _xform_parts(sform)
        if (np.max(np.abs(qd - sd)) > _XFORM_DIRECTION_ATOL or np.max(np.abs(qs - ss) / ss) > _XFORM_SPACING_RTOL
                or np.max(np.abs(qo - so)) > _XFORM_ORIGIN_ATOL_MM):
            raise _bad("qform/sform", "both are set and describe different grids", path, "inconsistent_geometry")
    affine = sform if sform is not None else qform
    assert affine is not None
    spacing = _xform_parts(affine)[0]
    if np.max(np.abs(pixdim[1:4] - spacing) / spacing) > _PIXDIM_RTOL:
        raise _bad("pixdim[1:4]", f"{pixdim[1:4].round(4).tolist()} disagrees with the {'sform' if sform is not None else 'qform'}"
                   f" voxel sizes {spacing.round(4).tolist()}", path, "inconsistent_geometry")
    unit = int(header["xyzt_units"]) & 0x07
    if unit not in _MM_PER_UNIT:
        raise _bad("xyzt_units", f"spatial unit code {unit} is not meter, mm or micron", path)
    if _MM_PER_UNIT[unit] != 1.0:
        affine = affine.copy()
        affine[:3, :] *= _MM_PER_UNIT[unit]
        _check_affine(affine, f"affine in mm (unit code {unit})", path)
    return affine


def _check_scaling(header: nib.Nifti1Header, path: str) -> tuple[float | None, float | None]:
    """scl_slope/scl_inter -> (slope, inter), both None when unscaled (slope 0 or NaN)."""
    try:
        return header.get_slope_inter()
    except Exception as exc:  # noqa: BLE001 - HeaderDataError for a valid slope with a non-finite intercept
        raise _bad("scl_inter", f"{float(header['scl_inter'])} with scl_slope {float(header['scl_slope'])}", path) from exc


def check_header(header: nib.Nifti1Header, path: str, limits: MemoryLimits, file_size: int | None = None) -> NiftiLayout:
    """Validate a NIfTI-1/2 header field by field -> :class:`NiftiLayout`; raises InputRejected naming the field.

    Order: the container (magic, dim, datatype, bitpix) -> size (memory caps, before anything is allocated)
    -> vox_offset -> geometry (pixdim, codes, quaternion, affines, units) -> scaling; the first failure wins.
    """
    shape, dtype = _check_container(header, path)
    limits.check_source(tuple(shape), dtype.itemsize, path)
    offset = _check_vox_offset(header, math.prod(shape) * dtype.itemsize, path, limits, file_size)
    affine = _check_geometry(header, path)
    slope, inter = _check_scaling(header, path)
    return NiftiLayout(tuple(shape), dtype, offset, slope, inter, affine)  # type: ignore[arg-type]


def _read_exactly(stream: BinaryIO, n: int, path: str) -> bytearray:
    """Read exactly ``n`` bytes into one preallocated buffer (no chunk list joined at the end)."""
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = stream.readinto(view[pos:])  # type: ignore[attr-defined]
        if not got:
            raise InputRejected("truncated", f"{pos} of {n} declared bytes", path)
        pos += got
    return buf


def _open(path: str) -> BinaryIO:
    """Open ``path`` for reading; an OS error becomes InputRejected("unreadable")."""
    try:
        return fileio.open_input(path)
    except PermissionError as exc:
        raise InputRejected("unreadable", f"PermissionError: {exc}", path) from exc
    except OSError as exc:
        raise InputRejected("unreadable", f"{type(exc).__name__}: {exc}", path) from exc


def _read_header(f: BinaryIO, path: str) -> tuple[nib.Nifti1Header, bool]:
    """The first 348 (NIfTI-1) or 540 (NIfTI-2) bytes, unchecked -> (header, gzipped); reads from the start."""
    first = f.read(2)
    if not first:
        raise InputRejected("empty_file", "0 bytes", path)
    gz = first == b"\x1f\x8b"
    f.seek(0)
    stream = gzip.GzipFile(fileobj=f) if gz else f
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header_bytes = stream.read(540)
            if len(header_bytes) < 348:
                raise InputRejected("truncated", f"{len(header_bytes)} header bytes", path)
            sizeof_hdr = {int.from_bytes(header_bytes[:4], e) for e in ("little", "big")}
            if 348 in sizeof_hdr:
                return nib.Nifti1Header(header_bytes[:348], check=False), gz
            if 540 in sizeof_hdr and len(header_bytes) == 540:
                return nib.Nifti2Header(header_bytes[:540], check=False), gz
            raise InputRejected("read_failed", "not a NIfTI-1/2 header (sizeof_hdr is not 348 or 540)", path)
    except InputRejected:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise InputRejected("truncated", f"{type(exc).__name__}: {exc}"[:200], path) from exc
    except Exception as exc:  # noqa: BLE001
        raise InputRejected("read_failed", f"not a NIfTI header: {type(exc).__name__}: {exc}"[:200], path) from exc


def _read_declared(f: BinaryIO, gz: bool, n: int, path: str) -> bytearray:
    """The first ``n`` bytes of the file (inflated when ``gz``), read from the start."""
    f.seek(0)
    stream = gzip.GzipFile(fileobj=f) if gz else f
    try:
        # read only what the header declares: a gzip bomb after the data is never inflated
        return _read_exactly(stream, n, path)
    except InputRejected:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise InputRejected("truncated", f"{type(exc).__name__}: {exc}"[:200], path) from exc


def load_nifti(path: str, limits: MemoryLimits | None = None) -> Volume:
    """Read one NIfTI file -> float32 Volume, array (K, J, I) = (D, H, W) in LPS; raises InputRejected with a
    named reason on bad input. ``limits`` bounds what is allocated (default: the default worker memory)."""
    limits = limits or MemoryLimits()
    f = _open(path)
    with f:
        header, gz = _read_header(f, path)
        file_size = None if gz else _size(f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layout = check_header(header, path, limits, file_size)
        ni, nj, nk = layout.shape_ijk
        count = ni * nj * nk
        raw = _read_declared(f, gz, layout.offset + count * layout.dtype.itemsize, path)
    # i varies fastest in the file: the bytes are the C-order (k, j, i) array, ITK order, without a copy
    stored = np.frombuffer(raw, dtype=layout.dtype, count=count, offset=layout.offset).reshape(nk, nj, ni)
    arr = stored.astype(np.float32)
    del stored, raw
    if layout.slope is not None:
        arr *= np.float32(layout.slope)
        if layout.inter:
            arr += np.float32(layout.inter)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    spacing, direction, origin = _xform_parts(layout.affine_ras)
    return Volume(arr, tuple(spacing), tuple(ras_to_lps @ origin), ras_to_lps @ direction)


def _size(f: BinaryIO) -> int | None:
    try:
        pos = f.tell()
        end = f.seek(0, 2)
        f.seek(pos)
        return int(end)
    except (OSError, AttributeError):
        return None

