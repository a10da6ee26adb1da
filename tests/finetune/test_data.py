"""Dataset lists and preprocessing on the real CT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune_ct import organ_classes
from mim_scale.errors import UserFacingError
from mim_scale.finetune.data import (TrainSampler, class_names, deterministic_transforms, load_cached,
                                     read_dataset)
from mim_scale.finetune.recipe import load_recipe


def _recipe(ct_dir, **extra):
    tree = {"classes": organ_classes(ct_dir),
            "preprocessing": {"spacing": [3.0, 3.0, 3.0], "hu_min": -175.0, "hu_max": 250.0},
            "train": {"batch_size": 2}}
    tree.update(extra)
    return load_recipe(tree)


def test_both_volumes_preprocess_to_the_recipe_grid_with_organs_where_the_labels_say(ct_dir, seg_dataset):
    recipe = _recipe(ct_dir)
    spec = read_dataset(seg_dataset, "segmentation")
    assert class_names(recipe, spec) == ["background", "liver", "spleen", "kidneys", "aorta", "stomach"]
    vols = load_cached(spec.training + spec.validation, deterministic_transforms(recipe, (32, 32, 32), True),
                       spec.source)
    window = lambda hu: (hu + 175.0) / 425.0  # noqa: E731 - HU -> [0, 1] under the recipe window
    for vol, contrast in zip(vols, (False, True)):
        img, lab = np.asarray(vol["image"])[0], np.asarray(vol["label"])[0]
        assert img.shape == lab.shape and img.min() >= 0.0 and img.max() <= 1.0
        assert set(np.unique(lab).astype(int)) <= set(range(6))
        liver = img[lab == 1].mean()
        # liver is soft tissue (+44 HU plain, +89 HU with contrast), never fat or bone: the label and
        # image grids line up after reorientation even though the DICOM labels are stored flipped
        assert window(20) < liver < window(120), liver
        if contrast:
            assert img[lab == 4].mean() > window(140)  # contrast-filled aorta (~ +177 HU)
    # DICOM: 500 mm in-plane -> 167 voxels at 3 mm, less the air cropped around the body; 20 slices
    # at 2 mm -> ~13 at 3 mm, padded to the 32-voxel window
    z, y, x = np.asarray(vols[1]["image"]).shape[1:]  # SPL, the default orientation: (z, y, x) like pre-training
    assert z == 32 and x <= 167 and y <= 167 and x * y < 0.8 * 167 * 167
    assert np.asarray(vols[1]["label"]).dtype == np.uint8
    assert np.asarray(vols[1]["label_fg_indices"]).dtype == np.int32


def test_sampler_is_a_function_of_the_step(ct_dir, seg_dataset):
    recipe = _recipe(ct_dir)
    spec = read_dataset(seg_dataset, "segmentation")
    vols = load_cached(spec.training, deterministic_transforms(recipe, (32, 32, 32), True), spec.source)
    sampler = TrainSampler(vols, recipe, (32, 32, 32))
    a, b, c = sampler.batch(5), sampler.batch(6), sampler.batch(5)
    assert a["image"].shape == (2, 1, 32, 32, 32) and a["label"].shape == (2, 1, 32, 32, 32)
    assert np.array_equal(a["image"], c["image"]) and np.array_equal(a["label"], c["label"])
    assert not np.array_equal(a["image"], b["image"])


def test_dataset_errors_name_the_file_and_entry(tmp_path, ct_dir):
    bad = tmp_path / "d.json"
    bad.write_text(json.dumps({"training": [{"image": "missing.nii.gz", "label": "x.nii.gz"}],
                               "validation": [{"image": "a", "label": "b"}]}))
    with pytest.raises(UserFacingError, match=r"d.json: training\[0\] image: file not found: .*missing.nii.gz"):
        read_dataset(bad, "segmentation")
    bad.write_text(json.dumps({"training": [{"image": str(ct_dir / "abdomen_pelvis_ct.nii.gz"),
                                             "label": str(ct_dir / "abdomen_pelvis_labels.nii.gz")}]}))
    with pytest.raises(UserFacingError, match="non-empty 'validation' list"):
        read_dataset(bad, "segmentation")
    bad.write_text("{not json")
    with pytest.raises(UserFacingError, match="not valid JSON"):
        read_dataset(bad, "segmentation")
    csv = tmp_path / "c.csv"
    csv.write_text(f"image,label,split\n{ct_dir / 'abdomen_pelvis_ct.nii.gz'},1,testing\n")
    with pytest.raises(UserFacingError, match="line 2: split must be"):
        read_dataset(csv, "classification")
    csv.write_text(f"image,label\n{ct_dir / 'abdomen_pelvis_ct.nii.gz'},liver\n")
    with pytest.raises(UserFacingError, match="line 2: classification label must be an integer"):
        read_dataset(csv, "classification")
    with pytest.raises(UserFacingError, match="CSV dataset is for classification"):
        read_dataset(csv, "segmentation")


def test_an_unreadable_volume_is_reported_by_name(tmp_path, ct_dir):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really a gzip stream")
    spec = tmp_path / "d.json"
    entry = {"image": str(broken), "label": str(ct_dir / "abdomen_pelvis_labels.nii.gz")}
    spec.write_text(json.dumps({"training": [entry], "validation": [entry]}))
    ds = read_dataset(spec, "segmentation")
    with pytest.raises(UserFacingError, match="cannot load .*broken.nii.gz"):
        load_cached(ds.training, deterministic_transforms(_recipe(ct_dir), (32, 32, 32), True), ds.source)
