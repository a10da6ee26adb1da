"""Tiny fine-tune on the real labelled CT: train on one volume, validate on the other.

The training volume is a plain (non-contrast) abdomen/pelvis CT at 3 mm; the validation volume is
a contrast-enhanced upper-abdomen DICOM series from another scanner. Both run through the CLI, the
shipped ``sample_ct`` recipe and the real tiny encoder from scratch.
"""

from __future__ import annotations

import json

import pytest

from finetune_ct import organ_classes
from mim_scale.cli import main
from mim_scale.finetune.recipe import load_recipe


@pytest.fixture(scope="module")
def seg_run(seg_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("ft_seg_run") / "run"
    rc = main(["finetune", "--task", "segmentation", "--data", str(seg_dataset), "--init", "scratch",
               "--model", "tiny", "--recipe", "sample_ct", "--out", str(run), "--set", "train.threads=1"])
    assert rc == 0
    return run


def test_recipe_classes_are_the_sample_labels(ct_dir):
    shipped = load_recipe("sample_ct").classes
    assert list(shipped) == list(organ_classes(ct_dir))
    assert {k: sorted(v) for k, v in shipped.items()} == {k: sorted(v) for k, v in organ_classes(ct_dir).items()}


def test_per_organ_dice_is_reported_and_the_liver_is_found(seg_run):
    summary = json.loads((seg_run / "summary.json").read_text())
    dice = summary["validation"]["per_class_dice"]
    assert list(dice) == ["liver", "spleen", "kidneys", "aorta", "stomach"]
    assert dice["kidneys"] is None  # not in the validation slab: reported as absent, not as 0 or 1
    for organ in ("liver", "spleen", "aorta", "stomach"):
        assert isinstance(dice[organ], float) and 0.0 <= dice[organ] <= 1.0
    print("per-organ Dice:", json.dumps(dice))
    assert dice["liver"] > 0.5
    vol = summary["validation"]["per_volume"][0]
    assert vol["voxels_gt"]["liver"] > 10_000 and vol["voxels_gt"]["kidneys"] == 0
    run_info = json.loads((seg_run / "run.json").read_text())
    assert run_info["init"] == "scratch" and run_info["roi_size"] == [16, 64, 64]
    lines = [json.loads(line) for line in (seg_run / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in lines if "loss" in e]
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_evaluate_reproduces_the_runs_validation(seg_run, tmp_path):
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--run", str(seg_run), "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["kind"] == "evaluation" and report["task"] == "segmentation"
    got = report["runs"]["finetuned"]["validation"]["per_class_dice"]
    want = json.loads((seg_run / "summary.json").read_text())["validation"]["per_class_dice"]
    assert got.keys() == want.keys()
    for organ, value in want.items():
        assert got[organ] == (None if value is None else pytest.approx(value, abs=1e-5))
