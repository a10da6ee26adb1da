"""Reconstruction and loss-curve PNGs, drawn from the real sample CT."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread

from mim_scale.pictures import loss_keys, reconstruction_panels, save_loss_curves_png, save_reconstruction_png


@pytest.fixture(scope="module")
def ct_crop(ct_dir) -> torch.Tensor:
    """(1, 1, 64, 64, 64) crop of the real abdomen CT, axes (D, H, W) as in the shards, HU window -> [0, 1]."""
    img = nib.as_closest_canonical(nib.load(ct_dir / "abdomen_pelvis_ct.nii.gz"))
    # RAS (x, y, z) -> the shards' (D, H, W) = (z, y, x) with H towards posterior, W towards left (LPS)
    vol = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)[:, ::-1, ::-1]
    d, h, w = vol.shape
    crop = vol[d // 2 - 32 : d // 2 + 32, h // 2 - 32 : h // 2 + 32, w // 2 - 32 : w // 2 + 32]
    assert crop.shape == (64, 64, 64), vol.shape
    x = torch.from_numpy(np.clip((crop + 160.0) / 400.0, 0.0, 1.0).copy())
    assert x.std() > 0.1  # real anatomy, not a blank crop
    return x[None, None]


def _hand_recon(crop: torch.Tensor) -> dict:
    """Two levels built from the CT: the input, a patch mask, and a coarse 'prediction' of it."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, x in (("l1", crop[..., :32, :32, :32]), ("l2", F.avg_pool3d(crop, 2))):
        keep = (torch.rand(1, 1, 4, 4, 4, generator=g) > 0.6).float()
        keep = F.interpolate(keep, size=x.shape[2:], mode="nearest")
        pred = F.interpolate(F.avg_pool3d(x, 4), size=x.shape[2:], mode="nearest")
        out[name] = {"input": x, "masked": x * keep, "mask": keep, "pred": pred, "composite": x * keep + pred * (1 - keep)}
    return out


def test_reconstruction_png_shows_the_ct_mid_slices(ct_crop, tmp_path):
    recon = _hand_recon(ct_crop)
    rows = reconstruction_panels(recon)
    assert [(lvl, [c for c, _ in cols]) for lvl, _, cols in rows] == [
        ("l1", ["input", "masked", "pred", "composite"]),
        ("l2", ["input", "masked", "pred", "composite"]),
    ]
    np.testing.assert_array_equal(rows[0][2][0][1], ct_crop[0, 0, 16, :32, :32].numpy())  # axial, D // 2
    path = save_reconstruction_png(recon, tmp_path / "pics" / "recon_step10.png", title="step 10")
    png = imread(path)
    assert png.shape[0] > png.shape[1] * 0.4 and png.shape[1] >= 900  # 2 rows x 4 columns
    gray = png[..., :3].mean(axis=-1)
    assert gray.std() > 0.1  # the CT drew something
    assert sorted(p.name for p in path.parent.iterdir()) == ["recon_step10.png"]  # no temp file left


def test_reconstruction_png_from_the_real_model(ct_crop, tmp_path):
    from mim_scale.config import load_config
    from mim_scale.model import build_model

    torch.manual_seed(0)
    model = build_model(load_config("tiny"))
    recon = model.reconstruct(ct_crop, generator=torch.Generator().manual_seed(1), max_views=1)
    rows = reconstruction_panels(recon)
    assert [lvl for lvl, _, _ in rows] == sorted(recon, key=lambda k: int(k[1:]))
    assert len(rows) == 3
    path = save_reconstruction_png(recon, tmp_path / "recon.png")
    assert imread(path).shape[1] >= 900


def test_tolerates_missing_levels_and_columns(ct_crop, tmp_path):
    x = ct_crop[0, :, :32, :32, :32].numpy()  # (C, D, H, W) -> as (N, D, H, W) with N = 1
    recon = {"level3": {"input": x, "pred": x * 0.5}, "level2": {"input": x}}
    rows = reconstruction_panels(recon)
    assert [(lvl, [c for c, _ in cols]) for lvl, _, cols in rows] == [("level2", ["input"]), ("level3", ["input", "pred"])]
    save_reconstruction_png(recon, tmp_path / "r.png", max_views=2)
    assert imread(tmp_path / "r.png").ndim == 3


def test_bad_reconstructions_are_named():
    with pytest.raises(ValueError, match="empty"):
        reconstruction_panels({})
    with pytest.raises(ValueError, match=r"reconstruction\['l1'\]\['pred'\]: expected a \(N, C, D, H, W\)"):
        reconstruction_panels({"l1": {"input": np.zeros((1, 1, 4, 4, 4)), "pred": np.zeros((4, 4))}})
    with pytest.raises(ValueError, match=r"reconstruction\['l2'\]: none of"):
        reconstruction_panels({"l2": {"mask": np.zeros((1, 1, 4, 4, 4))}})


def test_loss_curves_png(tmp_path):
    history = [
        {"step": s, "rec_l1": 1 / s, "rec_l2": 0.8 / s, "rec_l3": 0.6 / s, "align_12": 0.1, "total": 2.5 / s, "lr": 1e-3}
        for s in range(1, 21)
    ]
    history[7]["rec_l2"] = math.nan
    del history[3]["rec_l3"]
    history.append({"step": 21, "align_23": 0.05})
    assert loss_keys(history) == ["rec_l1", "rec_l2", "rec_l3", "align_12", "align_23", "total"]
    path = save_loss_curves_png(history, tmp_path / "loss.png")
    png = imread(path)
    assert png.shape[1] >= 1100 and png.shape[0] >= 500  # 3 x 2 small plots


def test_bad_histories_are_named(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        save_loss_curves_png([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="record 1 has no 'step'"):
        save_loss_curves_png([{"step": 1, "total": 1.0}, {"total": 0.5}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no loss keys"):
        save_loss_curves_png([{"step": 1, "lr": 1.0}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_validation_points_share_their_losss_plot(tmp_path):
    history = [{"step": s, "rec_l1": 1 / s, "total": 2 / s} for s in range(1, 21)]
    plain = imread(save_loss_curves_png(history, tmp_path / "plain.png"))
    for s in (10, 20):
        history[s - 1].update({"val_rec_l1": 1.1 / s, "val_total": 2.2 / s})
    assert loss_keys(history) == ["rec_l1", "total"]  # no extra panels for val_*
    with_val = imread(save_loss_curves_png(history, tmp_path / "val.png"))
    assert with_val.shape == plain.shape

    def orange(img):  # matplotlib's second colour (C1, #ff7f0e): the validation points
        rgb = img[..., :3]
        return int(((rgb[..., 0] > 0.9) & (np.abs(rgb[..., 1] - 0.5) < 0.1) & (rgb[..., 2] < 0.2)).sum())

    assert orange(plain) == 0 and orange(with_val) > 50
