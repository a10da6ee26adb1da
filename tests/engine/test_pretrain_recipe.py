"""The recipe the engine runs with is the one `mim-scale plan` prints; units of the counters; fp32 targets.

One launch on 2 CPU processes (gloo, bf16) and one on 1 process; each derives its steps from epochs over the
real-CT manifest (2 volumes) and keeps a global batch of 8 crops by accumulation (2 and 4 micro-steps).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mim_scale.cli import main
from mim_scale.config import load_config
from mim_scale.engine.local import Job, free_port, launch_jobs
from mim_scale.rundir import RECIPE_FILE
from mim_scale.plan import make_plan

GLOBAL = ("train.steps=0", "train.epochs=4", "train.warmup_epochs=2", "train.global_batch_crops=8", "train.lr=0",
          "train.base_lr=3e-3", "data.crops_per_volume=2")


@pytest.fixture(scope="module")
def recipe_runs(engine_shards, tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    two = [Job(tiny_config(engine_shards, *GLOBAL, "train.micro_batch=2", "launch.workers=2"), root / "w2_micro2")]
    one = [Job(tiny_config(engine_shards, *GLOBAL, "train.micro_batch=2", "launch.workers=1"), root / "w1_micro2")]
    launch_jobs(two, workers=2)
    launch_jobs(one, workers=1)
    return {job.run_dir.name: job for job in two + one}


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("workers", [2, 8])
def test_plan_prints_the_published_recipe(workers, capsys):
    assert main(["plan", "--config", "base", "--workers", str(workers), "--json"]) == 0
    recipe = json.loads(capsys.readouterr().out)["recipe"]
    assert recipe["crops_per_step"] == 128 and recipe["peak_lr"] == pytest.approx(2e-4)
    assert recipe["micro_batch_crops"] * recipe["grad_accum"] * workers == 128
    # with the paper's 10k volumes: 78.1 steps per epoch, 40 warm-up epochs of 800
    assert main(["plan", "--config", "base", "--workers", str(workers), "--volumes", "10000", "--json"]) == 0
    recipe = json.loads(capsys.readouterr().out)["recipe"]
    assert (recipe["warmup_steps"], recipe["total_steps"]) == (3125, 62500)


def test_plan_refuses_an_elastic_range_that_breaks_the_batch(capsys):
    assert main(["plan", "--config", "base", "--workers", "24,32"]) == 2
    err = capsys.readouterr().err
    assert "[24, 25, 26, 27, 28, 29, 30, 31]" in err and "1, 2, 4, 8, 16, 32, 64" in err


def test_plan_equals_what_the_engine_runs(recipe_runs, engine_shards):
    for name, job in recipe_runs.items():
        ran = json.loads((job.run_dir / RECIPE_FILE).read_text())
        planned = make_plan(job.cfg).recipe.as_dict()
        assert ran == planned, (name, {k: (ran.get(k), planned.get(k)) for k in planned if ran.get(k) != planned.get(k)})
        # 2 volumes, 8 crops = 4 volume reads per step: 0.5 steps per epoch, so 4 epochs = 2 steps
        assert (ran["crops_per_step"], ran["total_steps"], ran["warmup_steps"]) == (8, 2, 1), name
        history = _history(job.run_dir)
        assert [h["step"] for h in history] == [1, 2]
        assert history[-1]["crops_per_step"] == 8 and history[0]["lr"] == pytest.approx(ran["peak_lr"])
    accum = {name: json.loads((job.run_dir / RECIPE_FILE).read_text())["grad_accum"] for name, job in recipe_runs.items()}
    assert accum == {"w2_micro2": 2, "w1_micro2": 4}


def test_counters_are_in_their_units(recipe_runs):
    """tokens and views are per crop in the model's output: at micro-batch 2 x accumulation 2 x 2 workers a step
    sees 8 crops' worth, not 2 micro-batches' worth."""
    plan = make_plan(recipe_runs["w2_micro2"].cfg)
    for name, job in recipe_runs.items():
        first, second = _history(job.run_dir)
        assert first["crops_seen"] == 8 and second["crops_seen"] == 16, name
        assert first["tokens_seen"] == 8 * plan.tokens_per_crop, name
        assert first["views_seen"] == 8 * plan.views_per_crop, name
        assert first["volumes_seen"] == 4, name  # 2 crops per volume read


def _capture_worker(rank: int, port: int, cfg_tree: dict, run_dir: str, out: str) -> None:
    """One rank of a bf16 run through run_training, recording what the model's step received."""
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    from pathlib import Path

    from mim_scale.config import from_dict
    from mim_scale.engine.loop import Reporter, run_training
    from mim_scale.model.mim import MiMModel
    from mim_scale.model.views import draw_masks

    seen = []
    original = MiMModel.step

    def step(self, crops, *, generator=None, progress=0.0, draw=None):
        draw = draw or draw_masks(crops.shape[0], self.cfg.model, self.cfg.masking, crops.device, generator)
        losses, aux = original(self, crops, progress=progress, draw=draw)
        if self.training and not seen:
            seen.append({"param_dtype": str(self._param_dtype()), "crops_dtype": str(crops.dtype),
                         "crops_off_bf16_grid": bool((crops != crops.bfloat16().float()).any()),
                         "level_dtypes": [str(lv.x.dtype) for lv in aux["levels"]],
                         # the views (targets) equal those cut from the same crops in float64, to fp32 rounding
                         "views_max_error": max(float((lv.x.double() - ref.x).abs().max()) for lv, ref in
                                                zip(aux["levels"], self.make_views(crops.double(), draw=draw)))})
        return losses, aux

    MiMModel.step = step
    cfg = from_dict(cfg_tree)
    run_training(cfg, run_dir=Path(run_dir), reporter=Reporter(Path(run_dir)))
    Path(out).write_text(json.dumps(seen[0]))


def test_bf16_run_cuts_targets_from_float32_crops(engine_shards, tiny_config, tmp_path):
    import torch.multiprocessing as mp

    cfg = tiny_config(engine_shards, "train.steps=1", "train.precision=bf16", "launch.workers=1")
    out = tmp_path / "seen.json"
    mp.spawn(_capture_worker, args=(free_port(), cfg.to_dict(), str(tmp_path / "run"), str(out)), nprocs=1)
    seen = json.loads(out.read_text())
    assert seen["param_dtype"] == "torch.bfloat16"  # the engine runs the model in bf16 ...
    assert seen["crops_dtype"] == "torch.float32" and seen["crops_off_bf16_grid"]  # ... on uncast crops
    assert seen["level_dtypes"] == ["torch.float32"] * 3 and seen["views_max_error"] < 1e-6


def test_config_error_when_the_batch_cannot_be_kept():
    cfg = load_config("base", ["train.global_batch_crops=128", "train.micro_batch=3"])
    from mim_scale.config import ConfigError
    from mim_scale.recipe import resolve

    with pytest.raises(ConfigError, match="train.global_batch_crops"):
        resolve(cfg, 2, 100)


@pytest.mark.slow
def test_plan_equals_what_the_engine_runs_on_8_workers(engine_shards, tiny_config, tmp_path):
    """8 gloo processes on one machine (slow: run outside CI, reported in the issue note)."""
    job = Job(tiny_config(engine_shards, *GLOBAL, "train.micro_batch=1", "launch.workers=8"), tmp_path / "w8")
    launch_jobs([job], workers=8)
    ran = json.loads((job.run_dir / RECIPE_FILE).read_text())
    assert ran == make_plan(job.cfg).recipe.as_dict() and (ran["crops_per_step"], ran["grad_accum"]) == (8, 1)
    assert _history(job.run_dir)[0]["tokens_seen"] == 8 * make_plan(job.cfg).tokens_per_crop
