"""A pre-training run writes TensorBoard events (read back with TensorBoard's own reader) and the picture of
the method, on real CT shards (one process, gloo)."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mim_scale.engine.local import Job, launch_jobs  # noqa: E402
from mim_scale.fileutil import read_jsonl  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def run(engine_shards, tiny_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tensorboard") / "tb-run"
    cfg = tiny_config(engine_shards, "train.zero_stage=2", f"train.steps={STEPS}", "train.validate_every=2",
                      "train.pictures_every=2", "train.validation_crops=2")
    launch_jobs([Job(cfg, run_dir)], workers=1)  # rank 0 writes the events: one process is enough
    return run_dir


def _events(run_dir) -> EventAccumulator:
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # rank 0 only
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_scalars_per_step_match_the_history(run):
    acc = _events(run)
    tags = set(acc.Tags()["scalars"])
    expected = {f"loss/{k}" for k in ("rec_l1", "rec_l2", "rec_l3", "align_12", "align_23", "total")}
    expected |= {"alignment/z_std_12", "alignment/z_std_23", "train/lr", "train/grad_norm",
                 "throughput/crops_per_s", "throughput/data_wait_s", "throughput/step_s",
                 "validation/rec_l1", "validation/rec_l2", "validation/rec_l3", "validation/total"}
    assert expected <= tags, sorted(expected - tags)
    history = read_jsonl(run / "history.jsonl")
    by_step = {h["step"]: h for h in history}
    loss = acc.Scalars("loss/rec_l1")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    for e in loss:
        assert e.value == pytest.approx(by_step[e.step]["rec_l1"], rel=1e-6)
    assert [e.step for e in acc.Scalars("validation/rec_l1")] == [2, 4]
    for e in acc.Scalars("throughput/crops_per_s"):
        h = by_step[e.step]
        assert e.value == pytest.approx(h["crops_per_step"] / h["step_seconds"], rel=1e-5)
    assert "validation/set/text_summary" in acc.Tags()["tensors"]


def test_reconstruction_image_every_pictures_every_steps(run):
    acc = _events(run)
    images = acc.Images("reconstruction")
    assert [e.step for e in images] == [2, 4]
    assert images[-1].width > 800 and images[-1].height > 600 and images[-1].encoded_image_string[:4] == b"\x89PNG"
    pictures = run / "pictures"
    assert (pictures / "reconstruction_step0000004.png").is_file() and (pictures / "loss_curves.png").is_file()
    # the predict-zeros yardstick, computed from the run's validation set and cached beside the pictures
    assert (pictures / "zero_losses.json").is_file()
