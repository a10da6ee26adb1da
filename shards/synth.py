"""HU-realistic synthetic CT phantoms, written as DICOM series or NIfTI. For scale tests and benchmarks only.

A phantom is an elliptic body (skin/fat shell, muscle), two lungs (air-filled parenchyma), liver,
spleen, kidneys, a contrast-filled aorta, a vertebral column (cortical shell, cancellous core) and
Gaussian noise, in air. Values in HU, int16, array order (D, H, W) = (z, y, x) in LPS.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# HU of each tissue (typical contrast-enhanced values)
TISSUE_HU = {
    "air": -1000, "lung": -850, "fat": -100, "muscle": 45, "liver": 90, "spleen": 80, "kidney": 150,
    "aorta": 180, "cancellous": 250, "cortical": 900,
}


def phantom(shape: tuple[int, int, int] = (64, 128, 128), seed: int = 0, noise_hu: float = 12.0) -> np.ndarray:
    """-> (D, H, W) int16 HU phantom. ``seed`` varies the organ sizes/positions slightly and the noise."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    j = lambda s: 1.0 + s * rng.uniform(-1, 1)  # noqa: E731 - small per-phantom jitter
    vol = np.full(shape, TISSUE_HU["air"], dtype=np.float32)
    body = (x / (0.9 * j(0.05))) ** 2 + (y / (0.7 * j(0.05))) ** 2 <= 1.0
    inner = (x / 0.82) ** 2 + (y / 0.62) ** 2 <= 1.0
    vol[body] = TISSUE_HU["fat"]
    vol[inner] = TISSUE_HU["muscle"]
    upper = z > 0.1 * j(0.5)
    for sx in (-0.4, 0.4):
        lung = ((x - sx) / 0.3) ** 2 + ((y + 0.05) / 0.4) ** 2 + ((z - 0.6) / 0.6) ** 2 <= 1.0
        vol[lung & upper] = TISSUE_HU["lung"]
    liver = ((x + 0.35 * j(0.1)) / 0.35) ** 2 + ((y + 0.1) / 0.35) ** 2 + ((z + 0.1) / 0.35) ** 2 <= 1.0
    vol[liver] = TISSUE_HU["liver"]
    spleen = ((x - 0.5) / 0.15) ** 2 + ((y - 0.15) / 0.15) ** 2 + ((z + 0.05) / 0.2) ** 2 <= 1.0
    vol[spleen] = TISSUE_HU["spleen"]
    for sx in (-0.25, 0.25):
        kidney = ((x - sx) / 0.1) ** 2 + ((y - 0.3) / 0.12) ** 2 + ((z + 0.4) / 0.2) ** 2 <= 1.0
        vol[kidney] = TISSUE_HU["kidney"]
    aorta = ((x + 0.05) / 0.07) ** 2 + ((y - 0.15) / 0.07) ** 2 <= 1.0
    vol[aorta & inner] = TISSUE_HU["aorta"]
    r = np.sqrt((x / 0.12) ** 2 + ((y - 0.42) / 0.12) ** 2)
    vol[(r <= 1.0)] = TISSUE_HU["cortical"]
    vol[(r <= 0.7)] = TISSUE_HU["cancellous"]
    vol += rng.normal(0.0, noise_hu, size=shape).astype(np.float32) * (vol > -900)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


def write_nifti(vol: np.ndarray, path: Path, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
                origin: tuple[float, float, float] = (0.0, 0.0, 0.0), dtype: type = np.int16) -> Path:
    """vol: (D, H, W) HU in LPS order -> NIfTI (RAS affine) on the same grid."""
    import nibabel as nib

    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
    img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)).astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _new_slice(path: Path, sop_uid: str, study_uid: str, series_uid: str, modality: str) -> FileDataset:
    """A CT image dataset to be saved at ``path``: file meta (explicit VR little endian) and identity tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = datetime.date(2020, 1, 1).strftime("%Y%m%d")
    ds.SeriesNumber = 1
    return ds


def _set_pixels(ds: FileDataset, hu: np.ndarray, signed: bool) -> None:
    """hu: (H, W) int16 HU -> 16-bit pixel tags and PixelData: signed with intercept 0, or unsigned 12-bit
    with intercept -1024 (values clipped to -1024..3071)."""
    ds.Rows, ds.Columns = int(hu.shape[0]), int(hu.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    if signed:
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        pix = hu.astype(np.int16)
    else:
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        pix = (np.clip(hu.astype(np.int32), -1024, 3071) + 1024).astype(np.uint16)
    ds.PixelData = pix.tobytes()


def write_dicom_series(
    vol: np.ndarray,
    folder: Path,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    origin: tuple[float, float, float] = (-64.0, -64.0, -100.0),
    iop: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    file_name: Callable[[int], str] = lambda i: f"IM{i:05d}.dcm",
    instance_number: Callable[[int], int] = lambda i: i + 1,
    tags: dict[str, object] | None = None,
    signed: bool = False,
) -> list[Path]:
    """vol: (D, H, W) int16 HU -> one DICOM file per slice (explicit VR little endian, uncompressed).

    Slice ``k`` sits at ``origin + k * sz * normal`` with ``normal = row x col`` of ``iop``. Unsigned
    pixels with RescaleIntercept -1024 by default (like most scanners), or signed with intercept 0.
    ``tags`` sets extra top-level attributes by keyword (e.g. PatientName) on every slice.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    paths = []
    for k in range(vol.shape[0]):
        sop_uid = generate_uid()
        path = folder / file_name(k)
        ds = _new_slice(path, sop_uid, study_uid, series_uid, modality)
        ds.InstanceNumber = instance_number(k)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.SliceThickness = f"{spacing[2]:.6f}"
        _set_pixels(ds, vol[k], signed)
        for kw, value in (tags or {}).items():
            setattr(ds, kw, value)
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def write_collection(out: Path, n: int, fmt: str = "nifti", shape: tuple[int, int, int] = (64, 128, 128),
                     spacing: tuple[float, float, float] = (1.0, 1.0, 2.0), seed: int = 0) -> list[Path]:
    """Write ``n`` phantoms (different seeds) under ``out`` as ``nifti`` files or ``dicom`` series folders."""
    if fmt not in ("nifti", "dicom"):
        raise ValueError("fmt must be 'nifti' or 'dicom'")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        vol = phantom(shape, seed=seed + i)
        if fmt == "nifti":
            paths.append(write_nifti(vol, out / f"phantom_{i:05d}.nii.gz", spacing=spacing))
        else:
            folder = out / f"phantom_{i:05d}"
            write_dicom_series(vol, folder, spacing=spacing)
            paths.append(folder)
    return paths


__all__ = ["phantom", "write_nifti", "write_dicom_series", "write_collection", "TISSUE_HU"]
