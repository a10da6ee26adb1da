"""Canonical orientation, resampling and cropping keep every voxel at its world position."""

from __future__ import annotations

import numpy as np
import pytest

from mim_scale.shards.dicom import list_files, load_series
from mim_scale.shards.geometry import (
    Volume, antialias_sigmas, canonicalize, crop_to_body, resample_isotropic, resampled_shape,
)
from mim_scale.shards.synth import phantom, write_dicom_series

ORIENTATIONS = {
    "axial": (1, 0, 0, 0, 1, 0),
    "axial_rotated_180": (-1, 0, 0, 0, -1, 0),
    "coronal": (1, 0, 0, 0, 0, -1),
    "sagittal": (0, 1, 0, 0, 0, -1),
    "slightly_oblique": (0.9998477, 0.0174524, 0, -0.0174524, 0.9998477, 0),
}


def _world_of_max(vol: Volume) -> np.ndarray:
    kji = np.unravel_index(int(np.argmax(vol.array)), vol.array.shape)
    return vol.index_to_world(np.asarray([kji]))[0]


def _centroid(vol: Volume) -> np.ndarray:
    """Intensity-weighted centroid (LPS mm)."""
    w = vol.array.ravel().astype(np.float64)
    return (vol.index_to_world(np.argwhere(np.ones(vol.array.shape, bool))) * w[:, None]).sum(axis=0) / w.sum()


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_dicom_orientations_match_simpleitk_in_lps(name, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    vol = phantom((10, 24, 32), seed=5)
    write_dicom_series(vol, tmp_path / name, spacing=(0.8, 0.7, 2.5), origin=(10.0, -20.0, 30.0), iop=ORIENTATIONS[name])
    ours = canonicalize(load_series(list_files(tmp_path / name)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / name)))
    img = sitk.DICOMOrient(reader.Execute(), "LPS")
    np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(img).astype(np.float32))
    np.testing.assert_allclose(ours.origin, img.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(ours.spacing, img.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ours.direction.ravel(), img.GetDirection(), atol=1e-5)
    assert np.all(np.diag(ours.direction) > 0.99)  # canonical: W->L, H->P, D->S


def test_canonicalize_keeps_every_voxel_at_its_world_position():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    for perm in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        for signs in ((1, 1, 1), (-1, 1, -1), (-1, -1, -1)):
            direction = np.eye(3)[:, perm] * np.asarray(signs)
            vol = Volume(arr, (0.5, 0.7, 1.3), (3.0, -4.0, 5.0), direction)
            can = canonicalize(vol)
            np.testing.assert_allclose(can.direction, np.eye(3), atol=1e-12)
            assert sorted(can.array.shape) == sorted(arr.shape)
            for _ in range(5):
                kji = tuple(int(rng.integers(0, n)) for n in arr.shape)
                world = vol.index_to_world(np.asarray([kji]))[0]
                back = np.linalg.solve(can.direction @ np.diag(can.spacing), world - np.asarray(can.origin))
                i, j, k = np.rint(back).astype(int)
                assert can.array[k, j, i] == arr[kji]


def test_near_45_degree_axes_are_rejected():
    from mim_scale.shards.rejects import InputRejected

    c = np.sqrt(0.5)
    vol = Volume(np.zeros((3, 3, 3), np.float32), (1, 1, 1), (0, 0, 0), [[c, -c, 0], [c, c, 0], [0, 0, 1]])
    with pytest.raises(InputRejected) as info:
        canonicalize(vol)
    assert info.value.reason == "ambiguous_orientation"


def test_resampling_keeps_voxel_zero_and_world_positions():
    vol = phantom((20, 40, 40), seed=2).astype(np.float32)
    src = Volume(vol, (0.8, 0.8, 2.0), (1.0, 2.0, 3.0), np.eye(3))
    out = resample_isotropic(src, 1.5)
    assert out.origin == src.origin and out.spacing == (1.5, 1.5, 1.5)
    assert out.array.shape == resampled_shape(vol.shape, src.spacing, 1.5) == (26, 21, 21)
    # extent within the source extent, and within one target voxel of it
    for n_out, n_in, s in zip(out.array.shape, vol.shape, src.spacing[::-1]):
        assert (n_out - 1) * 1.5 <= (n_in - 1) * s + 1e-6 < n_out * 1.5
    # a constant field stays constant (no edge darkening from the filter)
    const = resample_isotropic(Volume(np.full((9, 30, 30), 40.0, np.float32), (0.7, 0.7, 3.0), (0, 0, 0), np.eye(3)), 1.5)
    np.testing.assert_allclose(const.array, 40.0, atol=1e-3)
    # a smooth blob stays at its world position
    grid = Volume(np.zeros((20, 40, 40), np.float32), (0.8, 0.8, 2.0), (1.0, 2.0, 3.0), np.eye(3))
    pos = grid.index_to_world(np.argwhere(np.ones(grid.array.shape, bool)))
    centre = np.asarray([16.3, 17.9, 21.1])
    grid.array[...] = np.exp(-((pos - centre) ** 2).sum(axis=1) / (2 * 4.0**2)).reshape(grid.array.shape)
    np.testing.assert_allclose(_centroid(grid), centre, atol=0.05)
    np.testing.assert_allclose(_centroid(resample_isotropic(grid, 1.5)), centre, atol=0.05)


def test_antialias_filter_only_where_downsampling():
    sig = antialias_sigmas((0.5, 1.5, 3.0), 1.5)  # (D, H, W) order: z=3.0 up, y=1.5 same, x=0.5 down
    assert sig[0] == 0.0 and sig[1] == 0.0 and sig[2] > 0.5
    # a checkerboard at the source Nyquist frequency is removed, not aliased into a pattern
    board = np.indices((4, 64, 64)).sum(axis=0) % 2 * 200.0 - 100.0
    out = resample_isotropic(Volume(board.astype(np.float32), (0.5, 0.5, 1.5), (0, 0, 0), np.eye(3)), 1.5)
    assert float(np.abs(out.array[:, 2:-2, 2:-2]).max()) < 15.0


def test_crop_to_body_moves_the_origin_with_the_crop():
    vol = phantom((16, 64, 64), seed=1).astype(np.float32)
    src = Volume(vol, (1.0, 1.0, 2.0), (5.0, 6.0, 7.0), np.eye(3))
    cropped = crop_to_body(src)
    assert cropped.array.size < src.array.size
    np.testing.assert_allclose(_world_of_max(cropped), _world_of_max(src))
