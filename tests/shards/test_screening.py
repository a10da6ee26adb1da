"""DICOM screening on copies of the real sample series edited with pydicom: secondary capture, BurnedInAnnotation
YES, DERIVED / SECONDARY images and NaN float pixels are rejected with their reasons by default, each option lets
its kind through (and is named in the rejects report), an absent or NO BurnedInAnnotation builds, and head CT is
flagged face-bearing in the private linkage report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mim_scale.shards.builder import BuildConfig, build_shards

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _copy(src_files: list[Path], dst: Path, edit=None, only: int | None = None) -> Path:
    """Copy ``src_files`` into ``dst`` as a new series, applying ``edit(ds)`` to every file (or to file ``only``)."""
    dst.mkdir(parents=True)
    uid = pydicom.uid.generate_uid()
    for k, src in enumerate(src_files):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = uid
        if edit is not None and (only is None or only == k):
            edit(ds)
        ds.save_as(dst / src.name, enforce_file_format=False)
    return dst


def _set(**tags):
    def edit(ds):
        for kw, value in tags.items():
            setattr(ds, kw, value)
    return edit


def _secondary_capture(ds):
    ds.SOPClassUID = SC_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = SC_IMAGE_STORAGE


def _float_pixels_with_nan(ds):
    """HU as Float Pixel Data (uncompressed), one NaN voxel."""
    hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    hu[100, 200] = np.nan
    del ds.PixelData
    for kw in ("RescaleSlope", "RescaleIntercept", "PixelRepresentation", "BitsStored", "HighBit"):
        if kw in ds:
            delattr(ds, kw)
    ds.BitsAllocated = 32
    ds.FloatPixelData = hu.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian


@pytest.fixture(scope="module")
def series(ct_dir, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """name -> edited copy of an 8-slice window of the real series (different windows where built together, so no
    duplicate content; 8 slices at 2 mm resample to 11 at 1.5 mm, above the minimum extent)."""
    files = sorted((ct_dir / "abdomen_dicom").iterdir())
    root = tmp_path_factory.mktemp("screening")
    cases = {
        "plain": (None, None),  # BurnedInAnnotation absent, like the original
        "burned_in_no": (_set(BurnedInAnnotation="NO"), None),
        "head": (_set(BodyPartExamined="HEAD"), None),
        "burned_in": (_set(BurnedInAnnotation="YES"), 3),  # one file of the series says YES
        "secondary_capture": (_secondary_capture, None),
        "derived": (_set(ImageType=["DERIVED", "PRIMARY", "AXIAL"]), None),
        "secondary": (_set(ImageType=["ORIGINAL", "SECONDARY", "AXIAL"]), None),
        "nan": (_float_pixels_with_nan, 2),
    }
    out = {}
    for n, (name, (edit, only)) in enumerate(cases.items()):
        start = 2 * n % 12
        out[name] = _copy(files[start:start + 8], root / "in" / name, edit, only)
    return root, out


def _records(private: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (private / name).read_text().splitlines()]


EXPECTED = {"burned_in": "burned_in_annotation", "secondary_capture": "non_ct_sop_class", "derived": "derived_image",
            "secondary": "derived_image", "nan": "non_finite_values"}
OPTION = {"burned_in_annotation": "--allow-burned-in-annotation", "non_ct_sop_class": "--allow-non-ct-sop-class",
          "derived_image": "--allow-derived"}


def test_screened_by_default_with_their_reasons_and_options_named(series):
    root, paths = series
    rep = build_shards([f"ct={root / 'in'}"], root / "out", workers=0, progress=False)
    rejects = {r["source"]: r for r in _records(root / "out.private", "rejects.jsonl")}
    for name, reason in EXPECTED.items():
        rej = rejects[str(paths[name])]
        assert rej["reason"] == reason, (name, rej)
        if reason in OPTION:
            assert OPTION[reason] in rej["detail"]
    assert str(paths["burned_in"] / sorted(p.name for p in paths["burned_in"].iterdir())[3]) in rejects[str(paths["burned_in"])]["detail"]
    public = json.loads((root / "out" / "build_report.json").read_text())
    for reason, option in OPTION.items():
        assert option in public["reason_descriptions"][reason]
    linkage = {r["source"]: r for r in _records(root / "out.private", "linkage.jsonl")}
    assert set(linkage) == {str(paths[n]) for n in ("plain", "burned_in_no", "head")}
    assert rep.num_samples == 3
    assert linkage[str(paths["head"])]["face_bearing"] == "BodyPartExamined HEAD"
    assert linkage[str(paths["plain"])]["face_bearing"] == ""  # the sample says PARTIALBODY, CT Body
    # the flag stays private: neither the public report nor the manifest mentions it
    for text in (json.dumps(public), (root / "out" / "manifest.json").read_text()):
        assert "face_bearing" not in text and "BodyPartExamined" not in text


def test_each_option_lets_its_kind_through(series, tmp_path):
    root, paths = series
    inputs = [f"ct={paths[n]}" for n in ("burned_in", "secondary_capture", "derived", "nan")]
    cfg = BuildConfig(allow_burned_in_annotation=True, allow_non_ct_sop_class=True, allow_derived=True)
    rep = build_shards(inputs, tmp_path / "out", config=cfg, workers=0, progress=False)
    assert rep.num_samples == 3 and rep.rejected == {"non_finite_values": 1}  # NaN is never allowed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["build_config"]["allow_burned_in_annotation"] is True
    # one option alone lets only its own kind through
    rep = build_shards(inputs[:3], tmp_path / "out2", config=BuildConfig(allow_derived=True), workers=0, progress=False)
    assert rep.num_samples == 1 and rep.rejected == {"burned_in_annotation": 1, "non_ct_sop_class": 1}
