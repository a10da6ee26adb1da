"""Export fixtures: one real (tiny) pre-training run on the real CT, and its export.

The run: shards of the real abdomen/pelvis CT at 3 mm under the data-set name ``totalsegmentator_sample``
(its terms are in mim-scale's licence table: Apache-2.0), the tiny MiM on 32^3 crops / 16^3 views, one
worker, 2 steps, then a checkpoint. About 45 s on a loaded 2-core machine, once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def trained_run(ct_dir, tmp_path_factory) -> Path:
    """A finished tiny pre-training run folder (its ``checkpoints/`` hold a complete checkpoint)."""
    from mim_scale.config import load_config
    from mim_scale.engine.local import launch_local
    from mim_scale.shards.builder import build_shards

    root = tmp_path_factory.mktemp("export_run")
    build_shards([f"totalsegmentator_sample={ct_dir / 'abdomen_pelvis_ct.nii.gz'}"], root / "shards", spacing=3.0,
                 target_shard_bytes=1, workers=0, progress=False)
    cfg = load_config("tiny", [f"data.shards={root / 'shards'}", "data.crop_size=32", "model.view_size=16",
                               "data.num_workers=1", "metrics.enabled=false", "train.warmup_steps=2",
                               "train.lr=2e-3", "train.checkpoint_every=0", "train.steps=2", "train.precision=fp32"])
    launch_local(cfg, root / "run", 1)
    return root / "run"


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> Path:
    """The run exported to a local folder (read-only by convention: tests copy it before changing it)."""
    from mim_scale.export import export_run

    return export_run(trained_run, tmp_path_factory.mktemp("exports") / "tiny-v1")


@pytest.fixture
def export_cache(tmp_path, monkeypatch) -> Path:
    """A fresh pull cache for this test (``MIM_SCALE_CACHE``)."""
    monkeypatch.setenv("MIM_SCALE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "exports"


@pytest.fixture(scope="session")
def finetune_data(ct_dir, tmp_path_factory) -> Path:
    """The sample-CT segmentation dataset (train: abdomen/pelvis NIfTI; validate: the DICOM series)."""
    from mim_scale.sample_data import write_finetune_dataset

    return write_finetune_dataset(ct_dir, tmp_path_factory.mktemp("export_ft_data"))


@pytest.fixture(scope="session")
def evaluation_report(exported, finetune_data, tmp_path_factory) -> Path:
    """A real ``mim-scale evaluate`` comparison report (the export vs scratch, 2 steps each)."""
    from mim_scale.finetune.evaluate import compare_inits

    root = tmp_path_factory.mktemp("export_eval")
    compare_inits(finetune_data, [str(exported)], root / "runs", report=root / "report.json", recipe="sample_ct",
                  overrides=['task="segmentation"', "train.steps=2"], log=lambda msg: None)
    return root / "report.json"
