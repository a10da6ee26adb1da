"""Checkpoints: safetensors + JSON only, exact resume, incomplete folders ignored."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune_ct import organ_classes
from mim_scale.errors import UserFacingError
from mim_scale.finetune.checkpoint import latest_checkpoint, list_checkpoints
from mim_scale.finetune.train import finetune


def _recipe(ct_dir):
    return {"classes": organ_classes(ct_dir),
            "preprocessing": {"spacing": [3.0, 3.0, 3.0], "hu_min": -175.0, "hu_max": 250.0},
            "train": {"steps": 4, "batch_size": 1, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2,
                      "keep_last": 3, "log_every": 1, "layer_decay": 0.8},
            "eval": {"sw_batch_size": 4}}


def test_resume_reproduces_the_uninterrupted_run(ct_dir, seg_dataset, tmp_path):
    run = tmp_path / "run"
    logs: list[str] = []
    first = finetune(seg_dataset, "scratch", run, recipe=_recipe(ct_dir), model_config="tiny", log=logs.append)
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    for p in ckpts:
        assert sorted(f.name for f in p.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    final = load_file(str(ckpts[-1] / "model.safetensors"))
    opt = load_file(str(ckpts[-1] / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg") for k in opt)

    # lose the last checkpoint, as if the job had died after step 2, then resume
    shutil.rmtree(ckpts[-1])
    (run / "checkpoints" / ".tmp_step_00000003_999").mkdir()  # a half-written save is never picked
    (run / "checkpoints" / "step_00000003").mkdir()  # nor a folder without state.json
    assert latest_checkpoint(run).name == "step_00000002"
    logs.clear()
    again = finetune(seg_dataset, "scratch", run, recipe=_recipe(ct_dir), model_config="tiny", resume=True,
                     log=logs.append)
    assert any("resumed from" in line and "step_00000002" in line for line in logs)
    resumed = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert resumed.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(resumed[key], final[key], rtol=0, atol=1e-6, msg=key)
    assert again["validation"]["per_class_dice"] == pytest.approx(first["validation"]["per_class_dice"], abs=1e-6)


def test_a_used_run_folder_needs_resume_and_the_same_recipe(ct_dir, seg_dataset, tmp_path):
    run = tmp_path / "run"
    recipe = _recipe(ct_dir)
    recipe["train"].update(steps=1, checkpoint_every=0)
    finetune(seg_dataset, "scratch", run, recipe=recipe, model_config="tiny", log=lambda m: None)
    with pytest.raises(UserFacingError, match="already holds checkpoints"):
        finetune(seg_dataset, "scratch", run, recipe=recipe, model_config="tiny", log=lambda m: None)
    recipe["train"]["lr"] = 5e-4
    with pytest.raises(UserFacingError, match="'recipe' differs"):
        finetune(seg_dataset, "scratch", run, recipe=recipe, model_config="tiny", resume=True, log=lambda m: None)
