"""Fixtures: fine-tuning datasets built from the real sample CT (helpers in finetune_ct.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from finetune_ct import dicom_to_nifti, organ_classes


@pytest.fixture(scope="session")
def seg_dataset(ct_dir: Path, tmp_path_factory) -> Path:
    """Decathlon JSON: train on the abdomen/pelvis volume, validate on the DICOM series."""
    root = tmp_path_factory.mktemp("ft_seg")
    dicom_nii = dicom_to_nifti(ct_dir / "abdomen_dicom", root / "abdomen_dicom.nii.gz")
    tree = {
        "name": "mim-scale sample CT",
        "training": [{"image": str(ct_dir / "abdomen_pelvis_ct.nii.gz"),
                      "label": str(ct_dir / "abdomen_pelvis_labels.nii.gz")}],
        "validation": [{"image": dicom_nii.name, "label": str(ct_dir / "abdomen_dicom_labels.nii.gz")}],
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(tree, indent=1))
    return path


@pytest.fixture(scope="session")
def cls_dataset(ct_dir: Path, seg_dataset: Path, tmp_path_factory) -> Path:
    """CSV of 96 mm cubes cut from both volumes, labelled 1 when >= 5% of the cube is liver.

    Training cubes come from the abdomen/pelvis volume, validation cubes from the DICOM series.
    Cubes are cut on the voxel grid of each volume (32 voxels at 3 mm in the pelvis volume; the
    matching 98 x 98 in-plane x 20 slices in the DICOM volume) and written as NIfTI with their affine.
    """
    root = tmp_path_factory.mktemp("ft_cls")
    classes = organ_classes(ct_dir)
    rows = []
    sources = [("training", ct_dir / "abdomen_pelvis_ct.nii.gz", ct_dir / "abdomen_pelvis_labels.nii.gz", 32),
               ("validation", seg_dataset.parent / "abdomen_dicom.nii.gz", ct_dir / "abdomen_dicom_labels.nii.gz", 98)]
    for split, img_path, lab_path, side in sources:
        img = nib.as_closest_canonical(nib.load(img_path))
        lab = nib.as_closest_canonical(nib.load(lab_path))
        assert np.allclose(img.affine, lab.affine, atol=1e-3), f"{img_path} and {lab_path} are on different grids"
        a = np.asarray(img.dataobj)
        liver = np.isin(np.asarray(lab.dataobj), classes["liver"])
        zside = min(side, a.shape[2])
        stride = side // 2
        for x in range(0, a.shape[0] - side + 1, stride):
            for y in range(0, a.shape[1] - side + 1, stride):
                for z in range(0, a.shape[2] - zside + 1, max(1, zside // 2)):
                    box = (slice(x, x + side), slice(y, y + side), slice(z, z + zside))
                    frac = float(liver[box].mean())
                    if 0.0 < frac < 0.05:
                        continue  # ambiguous: a sliver of liver
                    name = f"{split}_{x}_{y}_{z}.nii.gz"
                    affine = img.affine.copy()
                    affine[:3, 3] = img.affine[:3, :3] @ np.array([x, y, z]) + img.affine[:3, 3]
                    nib.save(nib.Nifti1Image(a[box].astype(np.int16), affine), root / name)
                    rows.append({"image": name, "label": int(frac >= 0.05), "split": split})
    path = root / "crops.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return path
