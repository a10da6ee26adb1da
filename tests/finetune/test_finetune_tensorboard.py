"""Fine-tuning writes TensorBoard events (loss, lr, Dice per class), read back with TensorBoard's reader."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mim_scale.cli import main  # noqa: E402


def test_dice_per_class_and_loss_in_tensorboard(seg_dataset, tmp_path):
    run = tmp_path / "run"
    rc = main(["finetune", "--task", "segmentation", "--data", str(seg_dataset), "--init", "scratch", "--model", "tiny",
               "--recipe", "sample_ct", "--out", str(run), "--set", "train.threads=1", "--set", "train.steps=4",
               "--set", "train.val_every=2", "--set", "train.log_every=1", "--set", "train.checkpoint_every=0"])
    assert rc == 0
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in metrics if "loss" in e}
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("finetune/loss")] == \
        [(s, losses[s]) for s in sorted(losses)]
    assert "finetune/lr" in tags
    summary = json.loads((run / "summary.json").read_text())
    dice = summary["validation"]["per_class_dice"]
    assert [e.step for e in acc.Scalars("dice/mean")] == [2, 4]
    assert acc.Scalars("dice/mean")[-1].value == pytest.approx(summary["validation"]["mean_dice"], rel=1e-6)
    for organ, value in dice.items():  # a class absent from the validation volumes has no point
        if value is None:
            assert f"dice/{organ}" not in tags
        else:
            assert acc.Scalars(f"dice/{organ}")[-1].value == pytest.approx(value, rel=1e-6)
