"""Engine fixtures: shards built once from the real CT, and a tiny config that trains in well under a
second per step on 2 CPU processes (gloo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mim_scale.config import Config, load_config

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mim-scale" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def engine_shards(ct_dir, tmp_path_factory) -> Path:
    """Shards of the real CT (NIfTI and DICOM series) at 3 mm, one volume per shard."""
    from mim_scale.shards.builder import build_shards

    out = tmp_path_factory.mktemp("engine_shards") / "shards"
    build_shards([str(ct_dir / "abdomen_pelvis_ct.nii.gz"), str(ct_dir / "abdomen_dicom")], out, spacing=3.0,
                 target_shard_bytes=1, workers=0, progress=False)
    return out


def tiny(shards: Path | str, *overrides: str) -> Config:
    """The tiny MiM on 32^3 crops (16^3 views), metrics server off, 2 workers x 1 crop."""
    base = [f"data.shards={shards}", "data.crop_size=32", "model.view_size=16", "data.num_workers=1",
            "metrics.enabled=false", "train.warmup_steps=2", "train.lr=2e-3", "train.checkpoint_every=0"]
    return load_config("tiny", base + list(overrides))


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(shards, "key=value", ...)``: see :func:`tiny`."""
    return tiny
