"""Held-out volumes: set aside by patient/volume when the shards are built, never in the training shards
(checked by sample key, the same salt keys both sets), validated on with the label held-out."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from mim_scale.errors import UserFacingError
from mim_scale.shards.holdout import build_with_holdout, group_of, holdout_dir


def _keys(out: Path) -> set[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    keys = set()
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["url"]) as tar:
            keys |= {Path(m.name).name.split(".")[0] for m in tar.getmembers() if m.isfile()}
    return keys


@pytest.fixture(scope="module")
def held_out_build(ct_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("holdout") / "shards"
    train, held = build_with_holdout([f"dicom={ct_dir / 'abdomen_dicom'}", f"nifti={ct_dir / 'abdomen_pelvis_ct.nii.gz'}"],
                                     out, holdout_list={str(ct_dir / "abdomen_dicom")}, spacing=3.0, workers=0,
                                     progress=False, target_shard_bytes=1)
    return out, train, held


def test_held_out_volumes_never_reach_the_training_shards(held_out_build):
    out, train, held = held_out_build
    assert held.manifest_path == holdout_dir(out) / "manifest.json" and not holdout_dir(out).is_relative_to(out)
    assert (train.num_samples, held.num_samples) == (1, 1)
    train_keys, held_keys = _keys(out), _keys(holdout_dir(out))
    assert len(train_keys) == 1 and len(held_keys) == 1 and not train_keys & held_keys
    assert json.loads(held.manifest_path.read_text())["datasets"] == {"dicom": 1}  # the series listed
    assert json.loads((out / "manifest.json").read_text())["datasets"] == {"nifti": 1}


def test_validation_on_the_held_out_shards_is_labelled_held_out(held_out_build):
    from mim_scale.config import load_config
    from mim_scale.engine.validate import draw_validation_set

    out, _, held = held_out_build
    cfg = load_config("tiny", [f"data.shards={out}", f"data.validation_shards={held.manifest_path}",
                               "data.crop_size=32", "model.view_size=16", "train.validation_crops=2"])
    assert draw_validation_set(cfg).source == "held-out"
    assert draw_validation_set(cfg.replace({"data.validation_shards": ""})).source == "seen"


def test_groups_are_patients_where_the_layout_says_so(tmp_path):
    root = tmp_path / "LIDC"
    assert group_of(str(root / "LIDC-0001" / "study" / "series"), root) == str(root / "LIDC-0001")
    assert group_of(str(root / "LIDC-0001" / "study2" / "series"), root) == str(root / "LIDC-0001")
    assert group_of(str(root / "scan.nii.gz"), root) == str(root / "scan.nii.gz")  # a flat folder: per volume


def test_nothing_or_everything_held_out_is_an_error(ct_dir, tmp_path):
    inputs = [str(ct_dir / "abdomen_pelvis_ct.nii.gz")]
    with pytest.raises(UserFacingError, match="no volume held out"):
        build_with_holdout(inputs, tmp_path / "a", fraction=0.0, workers=0, progress=False)
    with pytest.raises(UserFacingError, match="nothing left to train on"):
        build_with_holdout(inputs, tmp_path / "b", holdout_list={str(ct_dir / "abdomen_pelvis_ct.nii.gz")}, workers=0,
                           progress=False)
    with pytest.raises(UserFacingError, match=r"\[0, 1\)"):
        build_with_holdout(inputs, tmp_path / "c", fraction=1.0, workers=0, progress=False)
