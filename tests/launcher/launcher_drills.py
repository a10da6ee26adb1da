"""Helpers shared by the launcher tests and their subprocess scripts (importable without pytest)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

STEPS = 6
INTERVAL = 2


def drill_overrides(shards: Path, storage: Path, name: str, steps: int = STEPS) -> list[str]:
    return [f"data.shards={shards}", f"train.steps={steps}", f"train.checkpoint_every={INTERVAL}",
            "train.precision=fp32", "launch.workers=2", "launch.ray_num_cpus=2", "launch.max_failures=2",
            f"launch.storage={storage}", f"launch.name={name}"]


def model_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    from mim_scale.engine import checkpoint as ckpt

    return ckpt.consolidated_state_dict(Path(checkpoint))


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of ||a - b|| / ||b|| (0 where both are zero)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key in b:
        den = float(b[key].double().norm())
        num = float((a[key].double() - b[key].double()).norm())
        worst = max(worst, num / den if den else num)
    return worst


def subprocess_env(tmp: Path) -> dict[str, str]:
    """Environment for a child that starts its own Ray: private RAY_TMPDIR (short: Ray's socket paths
    must stay under 107 characters), one thread per process."""
    ray_tmp = Path(os.environ.get("MIM_SCALE_TEST_RAY_TMP", "/tmp")) / f"mimray-{os.getpid()}-{tmp.name[-12:]}"
    ray_tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1",
               MIM_SCALE_LOG="WARNING")
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *filter(None, [env.get("PYTHONPATH")])])
    return env


PYTHON = sys.executable
