"""The tiny model learns masked reconstruction on real CT crops (CPU).

Yardsticks, on a fixed validation set of real crops and masks: the step-0 loss, and the loss of
predicting zeros (the normalised target's mean) at the masked tokens of each level.
"""

from __future__ import annotations

import pytest
import torch

from mim_scale.config import load_config
from mim_scale.model import build_model
from mim_scale.model.compare import crop_stream, train
from mim_scale.model.ops import norm_pix_target
from mim_scale.model.validation import build_validation_set, load_ct_hu, validation_losses
from mim_scale.model.views import make_views


@pytest.fixture(scope="module")
def volume(ct_dir):
    return load_ct_hu(ct_dir / "abdomen_pelvis_ct.nii.gz")


def zero_prediction_losses(cfg, vset) -> dict[int, float]:
    """Per level: the masked loss of predicting 0 for every normalised voxel."""
    out = {}
    for lv in make_views(vset.crops, cfg.model, cfg.masking, draw=vset.draw):
        per_token = norm_pix_target(lv.x, cfg.model.patch_size, cfg.loss.norm_pix_eps).pow(2).mean(-1)
        out[lv.level] = float((per_token * lv.mask).sum() / lv.mask.sum())
    return out


def _learn(volume, overrides, steps, lr, batch):
    cfg = load_config("tiny", overrides)
    vset = build_validation_set([volume], cfg, 4, seed=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    before = validation_losses(model, vset)
    train(model, crop_stream([volume], cfg, batch, seed=0), steps, lr=lr, warmup=10)
    return cfg, vset, before, validation_losses(model, vset)


def test_tiny_mae_learns_on_real_ct(volume):
    cfg, vset, before, after = _learn(volume, ["masking.levels=1"], steps=100, lr=3e-3, batch=2)
    zero = zero_prediction_losses(cfg, vset)[1]
    assert after["val_rec_l1"] < 0.85 * before["val_rec_l1"]
    assert after["val_rec_l1"] < zero - 0.02


@pytest.fixture(scope="module")
def mim_200_steps(volume):
    """The issue's setting: tiny MiM, 200 CPU steps on real CT crops (batch 2, AdamW 3e-3)."""
    cfg, vset, before, after = _learn(volume, [], steps=200, lr=3e-3, batch=2)
    return cfg, before, after, zero_prediction_losses(cfg, vset)


def test_tiny_mim_learns_on_real_ct(mim_200_steps):
    """What 200 steps reach (README, 'Learning'): every level well below its step-0 loss, level 1 well
    below predicting zeros, both alignment losses down."""
    cfg, before, after, zero = mim_200_steps
    for level in (1, 2, 3):
        assert after[f"val_rec_l{level}"] < 0.85 * before[f"val_rec_l{level}"], (level, before, after)
    assert after["val_rec_l1"] < zero[1] - 0.04, (zero, after)
    assert after["val_align_12"] < before["val_align_12"] and after["val_align_23"] < before["val_align_23"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "not met: in 200 steps levels 2/3 reach ~0.80x step 0, ~0.98x/1.0x the zero loss; even 2000 steps give "
    "0.77x/0.72x (README 'Learning'). strict: if it ever passes, this marker must go"))
def test_tiny_mim_meets_the_issue_learning_bar(mim_200_steps):
    """The issue's bar: each level's masked loss below 0.7x step 0 and below zeros within 200 steps."""
    cfg, before, after, zero = mim_200_steps
    for level in (1, 2, 3):
        assert after[f"val_rec_l{level}"] < 0.7 * before[f"val_rec_l{level}"], (level, before, after)
        assert after[f"val_rec_l{level}"] < zero[level], (level, zero, after)


def test_learning_ceiling_script_runs(ct_dir):
    """scripts/learning_ceiling.py (the README's direct-fit yardstick) on a few crops: one line per level,
    the fit scored against the same zero losses as above."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "learning_ceiling.py"
    out = subprocess.run([sys.executable, str(script), "--ct", str(ct_dir / "abdomen_pelvis_ct.nii.gz"),
                          "--train-crops", "16"], capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"level (\d): .* zeros ([\d.]+), neighbour fit ([\d.]+)", out)
    assert [r[0] for r in rows] == ["1", "2", "3"], out
    assert [float(r[1]) for r in rows] == pytest.approx([0.986, 0.987, 0.923], abs=0.002)  # the validation set's
    assert float(rows[2][2]) < float(rows[2][1])  # level 3's smooth targets: the fit beats zeros even on 16 crops
