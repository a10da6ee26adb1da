"""Fixtures: fine-tuning datasets built from the real sample CT (helpers in finetune_ct.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_ct import dicom_to_nifti, write_liver_crops


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
    """CSV of liver / no-liver cubes: training from the abdomen/pelvis volume, validation from the DICOM series."""
    return write_liver_crops(ct_dir, seg_dataset.parent / "abdomen_dicom.nii.gz", tmp_path_factory.mktemp("ft_cls"))
