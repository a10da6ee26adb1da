"""Helpers for fine-tuning datasets built from the real sample CT (see ../shared/data/README.md).

- ``abdomen_pelvis_ct.nii.gz`` (3 mm, non-contrast abdomen/pelvis) with its TotalSegmentator labels;
- the 20-slice contrast-enhanced DICOM series, assembled to NIfTI with SimpleITK, with
  ``abdomen_dicom_labels.nii.gz`` (same physical grid, stored with the other in-plane axis order).
"""

from __future__ import annotations

import json
from pathlib import Path

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
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series_dir))
    assert len(files) == 20, f"expected the 20-slice series in {series_dir}, found {len(files)} files"
    reader.SetFileNames(files)
    sitk.WriteImage(reader.Execute(), str(out))
    return out


