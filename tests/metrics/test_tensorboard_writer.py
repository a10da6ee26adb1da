"""mim_scale.tensorboard: which record keys become which tags, what is skipped, and when no board is opened."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mim_scale import tensorboard as tb  # noqa: E402


def _read(path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_record_keys_become_tags(tmp_path):
    board = tb.open_board(True, tmp_path, rank=0)
    assert board is not None and board.log_dir == tmp_path / tb.SUBDIR
    board.step({"step": 3, "rec_l1": 0.5, "align_12": 1.9, "total": 2.0, "z_std_12": 0.12, "lr": 1e-3,
                "grad_norm": 2.5, "mfu": None, "step_seconds": 0.5, "crops_per_step": 4, "data_wait_seconds": 0.1,
                "val_rec_l1": 0.45, "validation_set": "held-out", "samples_seen": 12, "data_digest": "ab",
                "rec_l2": math.nan, "flag": True})
    board.finetune_validation(5, {"per_class_dice": {"liver": 0.8, "kidneys": None}, "mean_dice": 0.8})
    board.finetune_validation(6, {"accuracy": 0.75, "auc": 0.9, "classes": ["a", "b"]})
    board.close()
    acc = _read(tmp_path / tb.SUBDIR)
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    expected = {
        "loss/rec_l1": [(3, 0.5)], "loss/align_12": [(3, 1.9)], "loss/total": [(3, 2.0)],
        "alignment/z_std_12": [(3, 0.12)], "train/lr": [(3, 1e-3)], "train/grad_norm": [(3, 2.5)],
        "throughput/step_s": [(3, 0.5)], "throughput/crops_per_s": [(3, 8.0)], "throughput/data_wait_s": [(3, 0.1)],
        "validation/rec_l1": [(3, 0.45)], "dice/mean": [(5, 0.8)], "dice/liver": [(5, 0.8)],
        "validation/accuracy": [(6, 0.75)], "validation/auc": [(6, 0.9)],
    }
    assert sorted(scalars) == sorted(expected)  # NaN, None, booleans, counters and digests are not plotted
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points]
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert "validation/set/text_summary" in acc.Tags()["tensors"]


def test_no_board_off_rank_0_when_disabled_or_not_installed(tmp_path, monkeypatch):
    assert tb.open_board(True, tmp_path, rank=1) is None
    assert tb.open_board(False, tmp_path, rank=0) is None
    monkeypatch.setattr(tb, "available", lambda: False)
    assert tb.open_board(True, tmp_path, rank=0) is None
    assert not (tmp_path / tb.SUBDIR).exists()


def test_a_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    first = tb.open_board(True, tmp_path, rank=0)
    for step in range(1, 6):  # the first attempt logged steps 1-5, then died; its last checkpoint is step 3
        first.step({"step": step, "total": 10.0 + step})
    first.close()
    resumed = tb.open_board(True, tmp_path, rank=0, resumed_at=3)
    for step in (4, 5, 6):
        resumed.step({"step": step, "total": 20.0 + step})
    resumed.close()
    assert len(list((tmp_path / tb.SUBDIR).glob("events.out.tfevents.*"))) == 2
    points = [(e.step, e.value) for e in _read(tmp_path / tb.SUBDIR).Scalars("loss/total")]
    assert points == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
