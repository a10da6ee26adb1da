"""The MiM-vs-MAE harness (``benchmarks/mim_vs_mae.py``) spends equal FLOPs on both arms and scores both."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.mim_vs_mae import compare_mim_mae, main as compare_main
from mim_scale.config import load_config
from mim_scale.errors import UserFacingError
from mim_scale.model import flops_per_sample
from mim_scale.model.validation import load_ct_hu


@pytest.fixture(scope="module")
def volume(ct_dir):
    return load_ct_hu(ct_dir / "abdomen_pelvis_ct.nii.gz")


def test_compare_harness_spends_equal_flops(volume, tmp_path):
    cfg = load_config("tiny")
    logs = []
    report = compare_mim_mae(cfg, [volume], mim_steps=2, batch=1, val_crops=2, seed=0, log=logs.append)
    mim, mae = report["mim"], report["mae"]
    assert mim["steps"] == 2
    per_mae_step = flops_per_sample(cfg.replace({"masking.levels": 1}))
    assert abs(mae["flops"] - mim["flops"]) <= per_mae_step  # equal budget, to within one MAE step
    assert mae["steps"] > 10 * mim["steps"]  # a MiM sample is ~20 views
    for entry in (mim, mae):
        assert np.isfinite(entry["mae_task_val_loss"])
        assert entry["mae_task_val_loss"] != entry["mae_task_val_loss_before"]  # training moved it
    assert "val_rec_l3" in mim and "val_rec_l1" not in mae
    assert report["mim_minus_mae"] == pytest.approx(mim["mae_task_val_loss"] - mae["mae_task_val_loss"])
    assert len(logs) == 3
    with pytest.raises(UserFacingError, match="already plain MAE"):
        compare_mim_mae(load_config("tiny", ["masking.levels=1"]), [volume], mim_steps=1)


def test_compare_command_line(ct_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = compare_main(["--config", "tiny", "--ct", str(ct_dir / "abdomen_pelvis_ct.nii.gz"), "--mim-steps", "1",
                       "--batch", "1", "--val-crops", "1", "--save-valset", str(tmp_path / "v.safetensors"),
                       "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["mim"]["steps"] == 1 and report["mae"]["steps"] >= 1
    assert (tmp_path / "v.safetensors").is_file()
    rc = compare_main(["--config", "tiny", "--ct", str(tmp_path / "missing.nii.gz")])
    assert rc == 2
    assert "missing.nii.gz" in capsys.readouterr().err
