"""Fixtures of the shard tests: small volumes cut from the real sample CT, writers for the file formats."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SMALL_SPACING_MM = 6.0  # the 3 mm sample CT taken every second voxel


@pytest.fixture(scope="session")
def small_ct(ct_dir) -> np.ndarray:
    """(56, 51, 61) int16 HU, (D, H, W) in LPS order, 6 mm voxels: the real abdomen/pelvis CT subsampled."""
    img = nib.as_closest_canonical(nib.load(str(ct_dir / "abdomen_pelvis_ct.nii.gz")))
    ras = np.asarray(img.dataobj, dtype=np.int32)  # (i, j, k) = (R, A, S)
    dhw = np.transpose(ras[::-1, ::-1, :], (2, 1, 0))[::2, ::2, ::2]  # (S, P, L) = (D, H, W) in LPS
    return np.ascontiguousarray(np.clip(dhw, -1024, 3071).astype(np.int16))


@pytest.fixture(scope="session")
def itk_writers():
    """(ct_crop, write_itk): the helpers below, for test modules (tests are not a package)."""
    return ct_crop, write_itk


def ct_crop(small_ct: np.ndarray, n: int, depth: int = 16) -> np.ndarray:
    """The ``n``-th distinct volume cut from the small CT: ``depth`` slices starting at slice ``2 n``."""
    z0 = 2 * n
    assert z0 + depth <= small_ct.shape[0], "not enough slices for that many distinct crops"
    return np.ascontiguousarray(small_ct[z0:z0 + depth])


def write_itk(vol: np.ndarray, path: Path, spacing_mm: float = SMALL_SPACING_MM, origin=(10.0, -20.0, -300.0),
              compress: bool = False) -> Path:
    """(D, H, W) array in LPS order -> any format SimpleITK writes by suffix (.nii.gz, .mha, .mhd, .nrrd, .nhdr)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((spacing_mm,) * 3)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path
