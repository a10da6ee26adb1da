"""NIfTI (.nii, .nii.gz) volumes -> float32 HU :class:`Volume` in ITK order (not yet canonical).

The NIfTI affine maps (i, j, k) to RAS; the volume is converted to LPS and to array order (k, j, i).
Values are taken as stored after the header's scl_slope/scl_inter (NIfTI CT is stored in HU).
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from mim_scale.shards import fileio
from mim_scale.shards.dicom import MAX_SPACING_MM
from mim_scale.shards.geometry import Volume
from mim_scale.shards.rejects import InputRejected


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def load_nifti(path: str, max_voxels: int) -> Volume:
    """Read one NIfTI file; raises InputRejected with a named reason on bad input."""
    try:
        f = fileio.open_input(path)
    except PermissionError as exc:
        raise InputRejected("unreadable", f"PermissionError: {exc}", path) from exc
    except OSError as exc:
        raise InputRejected("unreadable", f"{type(exc).__name__}: {exc}", path) from exc
    with f:
        first = f.read(2)
        if not first:
            raise InputRejected("empty_file", "0 bytes", path)
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f) if first == b"\x1f\x8b" else f
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header_bytes = stream.read(540)
                if len(header_bytes) < 348:
                    raise InputRejected("truncated", f"{len(header_bytes)} header bytes", path)
                sizeof_hdr = {int.from_bytes(header_bytes[:4], e) for e in ("little", "big")}
                if 348 in sizeof_hdr:
                    header = nib.Nifti1Header(header_bytes[:348], check=False)
                elif 540 in sizeof_hdr and len(header_bytes) == 540:
                    header = nib.Nifti2Header(header_bytes[:540], check=False)
                else:
                    raise InputRejected("read_failed", "not a NIfTI-1/2 header (sizeof_hdr is not 348 or 540)", path)
        except InputRejected:
            raise
        except (EOFError, gzip.BadGzipFile, OSError) as exc:
            raise InputRejected("truncated", f"{type(exc).__name__}: {exc}"[:200], path) from exc
        except Exception as exc:  # noqa: BLE001
            raise InputRejected("read_failed", f"not a NIfTI header: {type(exc).__name__}: {exc}"[:200], path) from exc
        shape = tuple(int(s) for s in header.get_data_shape())
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3 or min(shape) < 2:
            raise InputRejected("not_3d", f"data shape {header.get_data_shape()}", path)
        if int(np.prod(shape, dtype=np.int64)) > max_voxels:
            raise InputRejected("too_large", f"shape {shape} exceeds {max_voxels} voxels", path)
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f) if first == b"\x1f\x8b" else f
        try:
            # read only what the header declares: a gzip bomb after the data is never inflated
            itemsize = np.dtype(header.get_data_dtype()).itemsize
            needed = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * itemsize
            raw = stream.read(needed)
            if len(raw) < needed:
                raise InputRejected("truncated", f"{len(raw)} of {needed} declared bytes", path)
            img = nib.Nifti1Image.from_bytes(raw) if isinstance(header, nib.Nifti1Header) else nib.Nifti2Image.from_bytes(raw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = np.asanyarray(img.dataobj)
        except InputRejected:
            raise
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise InputRejected("truncated", f"{type(exc).__name__}: {exc}"[:200], path) from exc
        except Exception as exc:  # noqa: BLE001
            msg = str(exc)
            reason = "truncated" if "too short" in msg or "buffer" in msg or "EOF" in msg else "read_failed"
            raise InputRejected(reason, f"{type(exc).__name__}: {msg}"[:200], path) from exc
    data = data.reshape(shape)
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputRejected("read_failed", f"unsupported data type {data.dtype}", path)
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        raise InputRejected("non_finite_values", f"{int((~np.isfinite(data)).sum())} NaN/Inf voxels", path)
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise InputRejected("sheared_affine", "affine is missing or not finite", path)
    m = affine[:3, :3].astype(np.float64)
    spacing = np.linalg.norm(m, axis=0)
    if not np.all(spacing > 1e-4) or np.any(spacing > MAX_SPACING_MM):
        raise InputRejected("absurd_spacing", f"voxel sizes {spacing.round(4).tolist()} mm", path)
    direction = m / spacing
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > 1e-3:
        raise InputRejected("sheared_affine", "affine columns are not orthogonal (shear or tilt)", path)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    direction = ras_to_lps @ direction
    origin = ras_to_lps @ affine[:3, 3]
    # nibabel array is (i, j, k); ITK array order is (k, j, i)
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    return Volume(arr, tuple(spacing), tuple(origin), direction)
