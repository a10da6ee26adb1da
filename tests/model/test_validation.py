"""The fixed validation set and per-level validation losses (the MiM-vs-MAE harness: tests/benchmarks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mim_scale.config import load_config
from mim_scale.errors import UserFacingError
from mim_scale.model import build_model
from mim_scale.model.validation import (ValidationSet, build_validation_set, load_ct_hu, mae_task_loss, random_crops,
                                        select_draw, validation_losses, validation_set_from_crops)
from mim_scale.model.views import make_views


@pytest.fixture(scope="module")
def volume(ct_dir):
    return load_ct_hu(ct_dir / "abdomen_pelvis_ct.nii.gz")


def test_random_crops_window_and_pad(volume):
    crops = random_crops(volume, 64, 3, np.random.default_rng(0))
    assert crops.shape == (3, 1, 64, 64, 64) and crops.dtype == torch.float32
    assert 0.0 <= float(crops.min()) and float(crops.max()) <= 1.0
    assert float(crops.std()) > 0.05  # real anatomy, not a constant
    big = random_crops(volume, 128, 1, np.random.default_rng(0))  # larger than the 101-voxel axis
    assert big.shape == (1, 1, 128, 128, 128)
    assert torch.all(big[0, 0, :, 101:, :] == 0.0)  # padded with air (-1000 HU -> 0)


def test_saved_set_round_trips_and_scores_the_same(volume, tmp_path):
    cfg = load_config("tiny")
    vset = build_validation_set([volume], cfg, 3, seed=7)
    path = vset.save(tmp_path / "val.safetensors")
    again = ValidationSet.load(path, cfg)
    assert torch.equal(again.crops, vset.crops)
    for a, b in ((vset.draw, again.draw), (vset.draw_mae, again.draw_mae)):
        assert a.tensors().keys() == b.tensors().keys()
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    torch.manual_seed(0)
    model = build_model(cfg)
    first = validation_losses(model, vset, batch_size=2)
    second = validation_losses(model, again, batch_size=1)
    assert set(first) == {"val_rec_l1", "val_rec_l2", "val_rec_l3", "val_align_12", "val_align_23", "val_total"}
    for key in ("val_rec_l1", "val_rec_l2", "val_rec_l3"):  # reconstruction: the same whatever the batching
        assert first[key] == pytest.approx(second[key], rel=1e-5)
    # alignment normalises over each batch's pairs (BatchNorm on batch statistics): the same at the same batching
    same = validation_losses(model, again, batch_size=2)
    for key in first:
        assert first[key] == pytest.approx(same[key], rel=1e-5)
    assert mae_task_loss(model, vset) == pytest.approx(mae_task_loss(model, again), rel=1e-6)
    # a different seed draws different crops
    other = build_validation_set([volume], cfg, 3, seed=8)
    assert not torch.equal(other.crops, vset.crops)


def test_select_draw_matches_a_per_crop_draw(volume):
    cfg = load_config("tiny")
    vset = build_validation_set([volume], cfg, 3, seed=1)
    whole = make_views(vset.crops, cfg.model, cfg.masking, draw=vset.draw)
    part = make_views(vset.crops[1:3], cfg.model, cfg.masking, draw=select_draw(vset.draw, 1, 3))
    for lw, lp in zip(whole, part):
        rows = (lw.crop_index >= 1).nonzero().flatten()
        assert torch.equal(lw.x[rows], lp.x) and torch.equal(lw.ids_keep[rows], lp.ids_keep)


def test_bad_validation_files_are_named(volume, tmp_path):
    cfg = load_config("tiny")
    with pytest.raises(UserFacingError, match="no such validation set file"):
        ValidationSet.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserFacingError, match="junk.safetensors"):
        ValidationSet.load(junk)
    path = build_validation_set([volume], cfg, 1).save(tmp_path / "v.safetensors")
    with pytest.raises(UserFacingError, match="masking"):
        ValidationSet.load(path, load_config("tiny", ["masking.level2_ratio=0.5"]))
    with pytest.raises(UserFacingError, match="no such CT file"):
        load_ct_hu(tmp_path / "nope.nii.gz")


def test_validation_set_from_stream_crops(volume):
    cfg = load_config("tiny")
    crops = random_crops(volume, 64, 2, np.random.default_rng(3))
    a = validation_set_from_crops(crops, cfg, seed=5)
    b = validation_set_from_crops(crops.clone(), cfg, seed=5)
    assert torch.equal(a.draw.ids3, b.draw.ids3) and torch.equal(a.crops, crops)
    with pytest.raises(ValueError, match=r"crops must be \(n, 1, 64, 64, 64\)"):
        validation_set_from_crops(crops[:, :, :32], cfg)
