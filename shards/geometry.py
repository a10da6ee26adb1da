"""Volumes in patient space: canonical orientation, isotropic resampling, HU to int16, body crop.

Convention (see :mod:`mim_scale.shards.format`): arrays are ``(D, H, W)`` = ``(z, y, x)``; ``spacing``
is ``(sx, sy, sz)``; ``origin`` is the LPS position of voxel ``[0, 0, 0]``; ``direction`` columns are
the LPS directions of the ``W``, ``H``, ``D`` axes. Canonical orientation = the axis permutation and
flips that bring ``direction`` closest to the identity (LPS+): W -> Left, H -> Posterior, D -> Superior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mim_scale.shards.format import HU_MAX, HU_MIN
from mim_scale.shards.rejects import InputRejected

# the nearest world axis of every array axis must be this much closer than the runner-up
_AXIS_MARGIN = 0.05


@dataclass
class Volume:
    """array: (D, H, W) float32 or int16 HU; spacing (sx, sy, sz) mm; origin LPS mm; direction (3, 3)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"volume must be 3D, got shape {self.array.shape}")
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)

    def index_to_world(self, kji: np.ndarray) -> np.ndarray:
        """kji: (N, 3) array indices in (D, H, W) order -> (N, 3) LPS positions in mm."""
        ijk = np.asarray(kji, dtype=np.float64)[:, ::-1]
        return ijk * np.asarray(self.spacing) @ self.direction.T + np.asarray(self.origin)


def canonicalize(vol: Volume) -> Volume:
    """Permute and flip the array axes so that W, H, D point as closely as possible to L, P, S.

    The residual rotation (oblique acquisitions) stays in ``direction``; the origin moves to the
    voxel that becomes ``[0, 0, 0]``. Raises InputRejected("ambiguous_orientation") near 45 degrees.
    """
    d = vol.direction
    perm = [0, 0, 0]  # world axis -> index axis (0 = W/i, 1 = H/j, 2 = D/k)
    used: set[int] = set()
    for a in range(3):
        col = np.abs(d[:, a])
        order = np.argsort(col)[::-1]
        if col[order[0]] - col[order[1]] < _AXIS_MARGIN:
            raise InputRejected("ambiguous_orientation", f"axis {a} direction {d[:, a].round(3).tolist()} is near 45 deg")
        w = int(order[0])
        if w in used:
            raise InputRejected("ambiguous_orientation", "two array axes map to the same patient axis")
        used.add(w)
        perm[w] = a
    arr = vol.array
    shape_ijk = arr.shape[::-1]
    # new index axis w takes old index axis perm[w]; flip where that old axis points backwards
    flips = [d[w, perm[w]] < 0 for w in range(3)]
    origin_idx = np.zeros(3)
    for w in range(3):
        if flips[w]:
            origin_idx[perm[w]] = shape_ijk[perm[w]] - 1
    new_origin = np.asarray(vol.origin) + d @ (np.asarray(vol.spacing) * origin_idx)
    # array axes are (k, j, i) = reversed index axes; array axis of index axis a is 2 - a
    new_arr_axes = [2 - perm[w] for w in (2, 1, 0)]
    out = np.transpose(arr, new_arr_axes)
    flip_arr_axes = tuple(2 - w for w in range(3) if flips[w])
    if flip_arr_axes:
        out = np.flip(out, axis=flip_arr_axes)
    new_dir = np.stack([d[:, perm[w]] * (-1.0 if flips[w] else 1.0) for w in range(3)], axis=1)
    new_spacing = tuple(vol.spacing[perm[w]] for w in range(3))
    return Volume(np.ascontiguousarray(out), new_spacing, tuple(new_origin), new_dir)


def resampled_shape(shape_dhw: tuple[int, ...], spacing: tuple[float, ...], target: float) -> tuple[int, int, int]:
    """Output (D, H, W) that keeps voxel 0 in place and stays inside the source extent."""
    out = []
    for n, s in zip(shape_dhw, spacing[::-1]):
        out.append(int(math.floor((n - 1) * s / target + 1e-6)) + 1)
    return tuple(out)  # type: ignore[return-value]


def antialias_sigmas(spacing: tuple[float, ...], target: float) -> tuple[float, float, float]:
    """Gaussian sigma (source voxels, (D, H, W) order) applied before downsampling an axis.

    The target grid should see a blur of about one target voxel (FWHM); the source already has
    about one source voxel, so the filter adds the difference in quadrature:
    ``sigma = sqrt(f**2 - 1) / (2 sqrt(2 ln 2))`` with ``f = target / source`` when ``f > 1``, else 0.
    """
    fwhm = 2.0 * math.sqrt(2.0 * math.log(2.0))
    out = []
    for s in spacing[::-1]:
        f = target / s
        out.append(math.sqrt(f * f - 1.0) / fwhm if f > 1.0 + 1e-6 else 0.0)
    return tuple(out)  # type: ignore[return-value]


def resample_isotropic(vol: Volume, target: float) -> Volume:
    """Trilinear resampling to ``target`` mm on every axis, anti-aliased where an axis is downsampled.

    Voxel ``[0, 0, 0]`` keeps its world position (origin and direction unchanged); the grid covers the
    source extent. Returns a float32 volume.
    """
    if target <= 0:
        raise ValueError("target spacing must be positive")
    arr = vol.array.astype(np.float32, copy=False)
    if all(abs(s - target) < 1e-6 for s in vol.spacing):
        return Volume(arr, vol.spacing, vol.origin, vol.direction)
    sigmas = antialias_sigmas(vol.spacing, target)
    if any(s > 0 for s in sigmas):
        arr = ndimage.gaussian_filter(arr, sigma=sigmas, mode="nearest", truncate=3.0)
    out_shape = resampled_shape(arr.shape, vol.spacing, target)
    scale = [target / s for s in vol.spacing[::-1]]
    out = ndimage.affine_transform(arr, np.asarray(scale), output_shape=out_shape, order=1, mode="nearest", prefilter=False)
    return Volume(out.astype(np.float32, copy=False), (target, target, target), vol.origin, vol.direction)


def to_int16_hu(arr: np.ndarray) -> np.ndarray:
    """Round and clip HU to [-1024, 3071] and store as int16."""
    return np.clip(np.rint(arr), HU_MIN, HU_MAX).astype(np.int16)


def crop_to_body(vol: Volume, threshold: float = -500.0, margin: int = 2) -> Volume:
    """Crop to the bounding box of voxels above ``threshold`` HU (air removal), plus ``margin`` voxels."""
    mask = vol.array > threshold
    if not mask.any():
        return vol
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(max(int(idx[0]) - margin, 0))
        hi.append(min(int(idx[-1]) + margin + 1, mask.shape[axis]))
    arr = vol.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    shift_ijk = np.asarray(lo[::-1], dtype=np.float64)
    origin = np.asarray(vol.origin) + vol.direction @ (np.asarray(vol.spacing) * shift_ijk)
    return Volume(np.ascontiguousarray(arr), vol.spacing, tuple(origin), vol.direction)
