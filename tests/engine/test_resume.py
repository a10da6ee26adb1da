"""Exact resume: 20 steps straight against 10 + SIGTERM-save + resume + 10 (same fp32 parameters, same data
order), SIGKILL of one process mid-run then resume from the last checkpoint, and resume of a 2-worker run on
1 and on 3 workers (consolidate and reshard: samples_seen continuous, global batch kept, loss continuous).
The resumed run starts from a checkpoint whose every DeepSpeed ``.pt`` file was replaced by a pickle that
creates a file when unpickled: resume reads only safetensors and JSON, so it is still exact and nothing ran;
and from a history.jsonl with a torn last line, which it cuts before appending."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mim_scale.engine import checkpoint as ckpt
from mim_scale.engine.local import Job, WorkerFailed, launch_jobs, launch_local, step_log

STEPS = 20


@pytest.fixture(scope="module")
def pair(engine_shards, tiny_config, tmp_path_factory):
    """Straight 20 steps, and the same run stopped by a SIGTERM on rank 1 after step 10 (saved at 11), then
    resumed."""
    root = tmp_path_factory.mktemp("resume")
    common = (f"train.steps={STEPS}", "train.zero_stage=2", "train.grad_accum=2", "train.checkpoint_every=0")
    straight = Job(tiny_config(engine_shards, *common), root / "straight")
    split = Job(tiny_config(engine_shards, *common), root / "split", sigterm_at=(1, 10))
    resumed = Job(tiny_config(engine_shards, *common), root / "split")
    launch_jobs([straight, split], workers=2)
    first_half = {r: step_log(split.run_dir, r) for r in (0, 1)}
    planted = plant_pickles(split.run_dir / "checkpoints", root / "pwned")
    assert len(planted) >= 3  # model states + one ZeRO optimizer shard per rank
    (root / "planted.pt").write_bytes(planted[0].read_bytes())  # kept for test_planted_pickles_would_have_run
    # rank 0 killed mid-append: a torn last line in history.jsonl, which the restart reads to draw its pictures
    with open(split.run_dir / "history.jsonl", "a") as f:
        f.write('{"step": 12, "total": 0.')
    (split.run_dir / "pictures" / "loss_curves.png").unlink()
    launch_jobs([resumed], workers=2)  # fresh processes: RNG, engine and stream rebuilt from disk
    assert not (root / "pwned").exists()  # no planted pickle was loaded
    return straight, split, first_half


class _RunsCode:
    """Unpickling this creates ``marker`` (what a hostile pickle in the run storage would do, less politely)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickles(folder: Path, marker: Path) -> list[Path]:
    """Replace every ``.pt`` under ``folder`` by a pickle that creates ``marker`` when loaded."""
    planted = sorted(folder.rglob("*.pt"))
    for path in planted:
        torch.save({"module": _RunsCode(marker), "optimizer_state_dict": _RunsCode(marker)}, path)
    return planted


def test_planted_pickles_would_have_run(pair):
    """The planted files are live: DeepSpeed's way of loading them (weights_only=False) runs their code;
    torch's safe loader refuses them. (Run after the resume, which the fixture checked ran nothing.)"""
    _, split, _ = pair
    marker, planted = split.run_dir.parent / "pwned", split.run_dir.parent / "planted.pt"
    assert not marker.exists()
    with pytest.raises(Exception):
        torch.load(planted, weights_only=True)
    assert not marker.exists()
    torch.load(planted, weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_torn_history_line_survives_the_restart(pair):
    """The resumed run cut the torn line before appending (every line parses, none glued) and drew its loss
    curves from the complete lines."""
    import json

    _, split, _ = pair
    text = (split.run_dir / "history.jsonl").read_text()
    assert text.endswith("\n") and '"total": 0.{' not in text
    steps = [json.loads(line)["step"] for line in text.splitlines()]
    assert steps[-1] == STEPS and 11 in steps
    assert (split.run_dir / "pictures" / "loss_curves.png").stat().st_size > 0


def test_sigterm_on_one_rank_saves_at_agreed_step(pair):
    _, split, first_half = pair
    # the signal reached rank 1 only, after step 10's agreement; both ranks agreed on it at step 11,
    # saved there together and stopped
    assert first_half[0][-1]["step"] == 11 and first_half[1][-1]["step"] == 11
    names = sorted(p.name for p in (split.run_dir / "checkpoints").iterdir())
    assert names[0] == "step_000000011"


def test_straight_equals_resumed(pair):
    straight, split, _ = pair
    a = ckpt.consolidated_state_dict(ckpt.latest_checkpoint(straight.run_dir / "checkpoints"))
    b = ckpt.consolidated_state_dict(ckpt.latest_checkpoint(split.run_dir / "checkpoints"))
    assert a.keys() == b.keys()
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-12)
        assert ((a[k] - b[k]).abs().max() / scale).item() <= 1e-6, k
    # and the parameters did move (the comparison is not between two untouched initialisations)
    torch.manual_seed(straight.cfg.train.seed)
    from mim_scale.model import build_model

    init = build_model(straight.cfg).state_dict()
    assert max((a[k] - init[k].float()).abs().max().item() for k in a) > 1e-3
    for rank in (0, 1):
        s, r = step_log(straight.run_dir, rank), step_log(split.run_dir, rank)
        assert [x["step"] for x in r] == list(range(1, STEPS + 1))
        assert [x["data_digest"] for x in s] == [x["data_digest"] for x in r]  # same crops, same order
        assert [x["samples_seen"] for x in s] == [x["samples_seen"] for x in r]
        np.testing.assert_allclose([x["total"] for x in s], [x["total"] for x in r], rtol=1e-5)
    state = ckpt.TrainState.read(ckpt.latest_checkpoint(split.run_dir / "checkpoints"))
    assert state.restarts == 1 and state.samples_seen == STEPS * 4


def test_sigkill_one_process_then_resume(engine_shards, tiny_config, tmp_path):
    cfg = tiny_config(engine_shards, "train.steps=7", "train.zero_stage=1", "train.checkpoint_every=3",
                      "train.keep_last=3")
    with pytest.raises(WorkerFailed):
        launch_local(cfg, tmp_path, 2, fault="kill:1:5")  # rank 1 SIGKILLed as it starts step 5
    assert ckpt.TrainState.read(ckpt.latest_checkpoint(tmp_path / "checkpoints")).step == 3
    before = step_log(tmp_path, 0)
    results = launch_local(cfg, tmp_path, 2)
    after = step_log(tmp_path, 0)[len(before):]
    assert [r["step"] for r in after] == [4, 5, 6, 7]  # resumed from the step-3 checkpoint
    assert after[0]["samples_seen"] == 8
    assert results[0]["step"] == 7 and results[0]["samples_seen"] == 14
    state = ckpt.TrainState.read(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert state.restarts == 1 and state.step == 7
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.fixture(scope="module")
def two_worker_run(engine_shards, tiny_config, tmp_path_factory):
    """7 steps on 2 workers x grad_accum 3 (6 crops per step), stopped by SIGTERM; shared by both reshards."""
    root = tmp_path_factory.mktemp("reshard")
    first = tiny_config(engine_shards, *RESHARD, "train.grad_accum=3")
    launch_local(first, root, 2, sigterm_at=(0, 6))  # agreed, saved and stopped at 7
    return root


RESHARD = ("train.steps=12", "train.zero_stage=2", "train.checkpoint_every=0", "train.keep_last=4")


@pytest.mark.parametrize("workers", [1, 3])
def test_resume_on_other_worker_count(two_worker_run, engine_shards, tiny_config, tmp_path, workers):
    """Continued on 1 x grad_accum 6 and 3 x grad_accum 2 (consolidate-and-reshard)."""
    import shutil

    shutil.copytree(two_worker_run, tmp_path, dirs_exist_ok=True)
    saved = ckpt.TrainState.read(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert saved.step == 7 and saved.samples_seen == 42 and saved.global_batch == 6
    before = step_log(tmp_path, 0)

    second = tiny_config(engine_shards, *RESHARD, f"train.grad_accum={6 // workers}")
    results = launch_local(second, tmp_path, workers)
    after = step_log(tmp_path, 0)[len(before):]
    assert [r["step"] for r in after] == list(range(8, 13))
    assert [r["samples_seen"] for r in after] == [6 * s for s in range(8, 13)]  # continuous, 6 per step
    assert all(r["samples_seen"] == 72 for r in results)
    state = ckpt.TrainState.read(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert state.world_size == workers and state.global_batch == 6 and state.restarts == 1

    # loss continuous: the first resumed steps' loss is in the range of the last steps before, and far
    # below what the fresh model gave at step 1 (a restart from scratch would show a jump)
    last = np.mean([r["total"] for r in before[-3:]])
    first_loss = before[0]["total"]
    resumed = np.mean([r["total"] for r in after[:2]])
    assert abs(resumed - last) < 0.5 * abs(first_loss - last) + 0.25 * last, (first_loss, last, resumed)

    # the optimizer state moved across: AdamW's step counter continued from 7 (bias correction intact)
    import mim_scale.engine.full_state as fs

    _, optimizer_step = fs.read(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert optimizer_step == 12
