"""Helpers for fine-tuning datasets built from the real sample CT (see ../shared/data/README.md).

- ``abdomen_pelvis_ct.nii.gz`` (3 mm, non-contrast abdomen/pelvis) with its TotalSegmentator labels;
- the 20-slice contrast-enhanced DICOM series, assembled to NIfTI with SimpleITK, with
  ``abdomen_dicom_labels.nii.gz`` (same physical grid, stored with the other in-plane axis order).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

# output class -> TotalSegmentator label values (labels_total.json)
ORGANS = {"liver": "liver", "spleen": "spleen", "kidneys": ("kidney_left", "kidney_right"),
          "aorta": "aorta", "stomach": "stomach"}


def organ_classes(ct_dir: Path) -> dict[str, list[int]]:
    names = {v: int(k) for k, v in json.loads((ct_dir / "labels_total.json").read_text()).items()}
    out = {}
    for cls, src in ORGANS.items():
        src = (src,) if isinstance(src, str) else src
        out[cls] = [names[s] for s in src]
    return out


def dicom_to_nifti(series_dir: Path, out: Path) -> Path:
    """The 20-slice series assembled by the project's own DICOM reader (as `mim-scale sample-data
    --finetune-dataset` does), written as NIfTI on its own grid."""
    from mim_scale.sample_data import write_finetune_dataset

    write_finetune_dataset(series_dir.parent, out.parent)
    written = out.parent / "abdomen_dicom.nii.gz"
    if written != out:
        written.replace(out)
    return out


def write_liver_crops(ct_dir: Path, dicom_nii: Path, root: Path) -> Path:
    """CSV of slabs cut from both volumes, labelled 1 when >= 5% of the cube is liver, 0 when none is.

    Training slabs come from the abdomen/pelvis volume, validation slabs from the DICOM series (as
    NIfTI: ``dicom_nii``). Slabs are ~96 x 96 x 40 mm on the voxel grid of each volume (32 x 32 x 13
    voxels at 3 mm; 98 x 98 x all 20 slices in the DICOM volume) and keep their own affine, so the
    recipe's resampling applies to them as to any scan. Slabs with a sliver of liver (0-5%) are left out.
    """
    classes = organ_classes(ct_dir)
    rows = []
    # (in-plane side, slices): ~96 x 96 x 40 mm slabs in both volumes
    sources = [("training", ct_dir / "abdomen_pelvis_ct.nii.gz", ct_dir / "abdomen_pelvis_labels.nii.gz", 32, 13),
               ("validation", dicom_nii, ct_dir / "abdomen_dicom_labels.nii.gz", 98, 20)]
    for split, img_path, lab_path, side, zside in sources:
        img = nib.as_closest_canonical(nib.load(img_path))
        lab = nib.as_closest_canonical(nib.load(lab_path))
        assert np.allclose(img.affine, lab.affine, atol=1e-3), f"{img_path} and {lab_path} are on different grids"
        a = np.asarray(img.dataobj)
        liver = np.isin(np.asarray(lab.dataobj), classes["liver"])
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
