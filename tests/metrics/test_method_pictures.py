"""The picture of the method on real CT: a chain of views with tissue, the hierarchy where it really is,
HU windowing; loss curves with an EMA, validation points and the predict-zeros line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread

from mim_scale.config import load_config
from mim_scale.model import build_model
from mim_scale.model.ops import masked_norm_pix_mse
from mim_scale.model.validation import build_validation_set, load_ct_hu, random_crops
from mim_scale.model.views import make_views
from mim_scale.pictures import (CHILD_COLOURS, TISSUE_MEAN_HU, ema, ema_weight, method_reconstruction,
                                save_loss_curves_png, save_method_png, zero_losses_for_run,
                                zero_prediction_losses)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def volume(ct_dir) -> np.ndarray:
    return load_ct_hu(ct_dir / "abdomen_pelvis_ct.nii.gz")


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _hu(x: torch.Tensor, cfg) -> float:
    return float(x.float().mean()) * (cfg.data.hu_max - cfg.data.hu_min) + cfg.data.hu_min


def test_chosen_views_have_tissue_and_sit_where_the_outlines_say(cfg, volume, model):
    # three random crops of the real CT (some mostly air around the body)
    crops = random_crops(volume, cfg.data.crop_size, 3, np.random.default_rng(5), cfg.data.hu_min, cfg.data.hu_max)
    pic = method_reconstruction(model, crops, seed=3)
    v, p = cfg.model.view_size, cfg.model.patch_size
    r = pic.recon
    assert sorted(r) == ["l1", "l2", "l3"] and pic.tissue
    for level in r:  # the issue's bar, measured on each panel's own input view
        assert r[level]["input"].shape[0] == 1
        assert _hu(r[level]["input"], cfg) > TISSUE_MEAN_HU, (level, pic.mean_hu)
        assert _hu(r[level]["input"], cfg) == pytest.approx(pic.mean_hu[level], abs=15.0)
    # level 2 is the outlined octant of level 1: its 2x2x2 means are level 1's voxels there
    h0, w0, size = pic.children["l1"]
    assert size == v // 2
    l1, l2, l3 = (r[k]["input"][0, 0] for k in ("l1", "l2", "l3"))
    depth = [d for d in (0, v // 2) if torch.allclose(l1[d:d + size, h0:h0 + size, w0:w0 + size],
                                                      F.avg_pool3d(l2[None, None], 2)[0, 0], atol=1e-5)]
    assert len(depth) == 1, "the level-2 view is not the outlined octant of the level-1 view"
    assert depth[0] <= pic.slices["l1"] < depth[0] + size  # the level-1 slice cuts through it
    # level 3 is the outlined patch of level 2, upsampled; the level-2 slice cuts through that patch
    h0, w0, size = pic.children["l2"]
    assert size == p
    z0 = pic.slices["l2"] - pic.slices["l2"] % p
    patch = l2[z0:z0 + p, h0:h0 + p, w0:w0 + p][None, None]
    up = F.interpolate(patch, size=(v, v, v), mode="trilinear", align_corners=False)[0, 0]
    assert torch.allclose(up, l3, atol=1e-5)
    assert pic.slices["l3"] == v // 2
    # level 2 was masked whole in level 1 (mask: 1 at visible voxels), level 3 in level 2
    h0, w0, size = pic.children["l1"]
    assert float(r["l1"]["mask"][0, 0, depth[0]:depth[0] + size, h0:h0 + size, w0:w0 + size].max()) == 0.0
    h0, w0, size = pic.children["l2"]
    assert float(r["l2"]["mask"][0, 0, z0:z0 + p, h0:h0 + p, w0:w0 + p].max()) == 0.0


def test_png_draws_window_outlines_and_shading(cfg, volume, model, tmp_path):
    crops = random_crops(volume, cfg.data.crop_size, 2, np.random.default_rng(1), cfg.data.hu_min, cfg.data.hu_max)
    path = save_method_png(method_reconstruction(model, crops, seed=0), tmp_path / "method.png", title="t")
    rgb = imread(path)[..., :3]

    def count(hex_colour: str, tol: float = 0.06) -> int:
        target = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return int((np.abs(rgb - target).max(axis=-1) < tol).sum())

    assert count(CHILD_COLOURS["l1"]) > 200 and count(CHILD_COLOURS["l2"]) > 200  # outlines and frames
    shade = rgb[..., 0] - rgb[..., 1]  # the magenta tint over masked tokens (gray panels have r == g)
    assert int((shade > 0.1).sum()) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["method.png"]


def test_air_only_crops_still_draw_and_say_so(cfg, model, tmp_path):
    crops = torch.zeros(1, 1, cfg.data.crop_size, cfg.data.crop_size, cfg.data.crop_size)  # -1000 HU
    pic = method_reconstruction(model, crops, seed=0, tries=2)
    assert not pic.tissue and min(pic.mean_hu.values()) == pytest.approx(cfg.data.hu_min)
    assert imread(save_method_png(pic, tmp_path / "air.png")).shape[1] > 800
    with pytest.raises(ValueError, match="crops must be"):
        method_reconstruction(model, crops[..., :16], seed=0)


def test_zero_prediction_losses_match_the_full_batch_loss(cfg, volume, tmp_path):
    vset = build_validation_set([volume], cfg, 3, seed=2)
    zeros = zero_prediction_losses(cfg, vset)  # one crop at a time
    levels = make_views(vset.crops, cfg.model, cfg.masking, draw=vset.draw)  # all crops at once
    for lv in levels:
        pred = torch.zeros(lv.x.shape[0], lv.mask.shape[1], cfg.model.patch_size ** 3)
        expected = float(masked_norm_pix_mse(pred, lv.x, lv.mask, cfg.model.patch_size, cfg.loss.norm_pix_eps))
        assert zeros[f"rec_l{lv.level}"] == pytest.approx(expected, rel=1e-5)
        assert 0.3 < expected <= 1.0  # real anatomy: most masked patches are not flat
    # for a run: read from its saved set, cached beside the pictures
    run = tmp_path / "run"
    vset.save(run / "validation_set.safetensors")
    assert zero_losses_for_run(cfg, run) == pytest.approx(zeros)
    cached = json.loads((run / "pictures" / "zero_losses.json").read_text())
    assert cached["losses"] == pytest.approx(zeros)
    assert zero_losses_for_run(cfg, tmp_path / "no-run") is None


def test_ema_removes_the_batch_to_batch_swing():
    assert ema([2.0] * 10, 0.9) == pytest.approx([2.0] * 10)  # bias-corrected from the first point
    swing = np.array([0.45, 1.0] * 100)  # batches alternating between two volumes, as in the quickstart
    smooth = ema(swing, ema_weight(len(swing)))
    assert swing[100:].std() > 0.25 and smooth[100:].std() < 0.05
    assert smooth[-1] == pytest.approx(0.725, abs=0.05)
    assert ema_weight(10) == 0.0 and 0.8 < ema_weight(200) < 0.9 and ema_weight(10**6) == 0.98


def test_loss_curves_show_zeros_and_labelled_validation(tmp_path):
    history = [{"step": s, "rec_l1": (0.45 if s % 2 else 1.0) / (1 + s / 50), "total": 2 / (1 + s / 50)}
               for s in range(1, 101)]
    plain = imread(save_loss_curves_png(history, tmp_path / "plain.png"))
    for s in (50, 100):
        history[s - 1].update({"val_rec_l1": 0.6, "validation_set": "held-out"})
    drawn = imread(save_loss_curves_png(history, tmp_path / "all.png", zeros={"rec_l1": 0.9}))
    assert drawn.shape == plain.shape

    def orange(img):  # matplotlib's C1: the validation points
        rgb = img[..., :3]
        return int(((rgb[..., 0] > 0.9) & (np.abs(rgb[..., 1] - 0.5) < 0.1) & (rgb[..., 2] < 0.2)).sum())

    def dark_gray(img):  # the predict-zeros line ("0.4" gray)
        rgb = img[..., :3]
        return int(((np.abs(rgb - 0.4) < 0.03).all(axis=-1)).sum())

    assert orange(plain) == 0 and orange(drawn) > 50
    assert dark_gray(drawn) > dark_gray(plain) + 50
