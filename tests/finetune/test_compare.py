"""``mim-scale evaluate --init``: pretrained against scratch at the same budget, as numbers.

The "pretrained" encoder here is the tiny MiM model after a short real pre-training on the training
volume (never on the validation scan), saved as a lone safetensors file of encoder weights, which
``--init`` loads with strict key matching (architecture from ``--model``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mim_scale.cli import main
from mim_scale.config import load_config
from mim_scale.errors import UserFacingError
from mim_scale.finetune.build import resolve_init
from mim_scale.model.plain_train import crop_stream, train
from mim_scale.model.mim import build_model
from mim_scale.model.validation import load_ct_hu

BUDGET = 12  # fine-tuning steps for each init


@pytest.fixture(scope="module")
def pretrained_file(ct_dir, tmp_path_factory):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    history = train(model, crop_stream([load_ct_hu(ct_dir / "abdomen_pelvis_ct.nii.gz")], cfg, 2, 0), 15,
                    lr=1e-3, warmup=3)
    assert history[-1]["total"] < history[0]["total"]
    path = tmp_path_factory.mktemp("pretrained") / "encoder.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()}, str(path))
    return path


def test_the_encoder_loads_strictly_and_a_mismatch_is_named(pretrained_file, tmp_path):
    init = resolve_init(str(pretrained_file), "tiny")
    assert init.pretrained and init.model == load_config("tiny").model
    assert init.meta["load_report"] == {"missing": [], "unexpected": []}
    weights = load_file(str(pretrained_file))
    for key, value in init.encoder.state_dict().items():
        assert torch.equal(value, weights[key]), key
    weights["stray.weight"] = torch.zeros(1)
    del weights["norm.bias"]
    bad = tmp_path / "bad.safetensors"
    save_file(weights, str(bad))
    with pytest.raises(UserFacingError, match=r"missing 1: \['norm.bias'\].*unexpected 1: \['stray.weight'\]"):
        resolve_init(str(bad), "tiny")


def test_evaluate_reports_pretrained_against_scratch_at_the_same_budget(pretrained_file, seg_dataset, tmp_path):
    report_path = tmp_path / "report.json"
    rc = main(["evaluate", "--init", str(pretrained_file), "--model", "tiny", "--data", str(seg_dataset),
               "--recipe", "sample_ct", "--set", f"train.steps={BUDGET}", "--set", "train.threads=1",
               "--work", str(tmp_path / "runs"), "--out", str(report_path)])
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["kind"] == "comparison" and report["recipe"]["train"]["steps"] == BUDGET
    assert set(report["runs"]) == {"pretrained:encoder.safetensors", "scratch"}
    pre, scratch = report["runs"]["pretrained:encoder.safetensors"], report["runs"]["scratch"]
    assert pre["pretrained"] and not scratch["pretrained"]
    assert pre["steps"] == scratch["steps"] == BUDGET and pre["samples_seen"] == scratch["samples_seen"]
    for run in (pre, scratch):
        assert isinstance(run["validation"]["per_class_dice"]["liver"], float)
        assert isinstance(run["validation"]["mean_dice"], float)
    delta = report["delta_vs_scratch"]["pretrained:encoder.safetensors"]
    assert delta["mean_dice"] == pytest.approx(pre["validation"]["mean_dice"] - scratch["validation"]["mean_dice"])
    assert delta["per_class_dice"]["kidneys"] is None  # absent from the validation scan
    print("pretrained vs scratch:", json.dumps({"pretrained": pre["validation"]["per_class_dice"],
                                                  "scratch": scratch["validation"]["per_class_dice"]}))
