"""Launcher fixtures: shards of the real sample CT, and the failure-free reference run.

The drills run in fp32 so that a resumed run can be compared with a failure-free one to 1e-6.
Tests that need their own Ray (a multi-node ``ray.cluster_utils.Cluster``, a driver that is killed)
run it in a subprocess with a private ``RAY_TMPDIR``, so they never meet the session cluster of
``tests/conftest.py::ray_cluster`` (nor another Ray on this machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher_drills import drill_overrides, subprocess_env


@pytest.fixture(scope="session")
def sample_shards(ct_dir, tmp_path_factory) -> Path:
    """manifest.json of WebDataset shards built from the sample CT (DICOM series + NIfTI volume)."""
    from mim_scale.shards.builder import build_shards
    from mim_scale.shards.inputs import InputSpec

    out = tmp_path_factory.mktemp("launcher-shards") / "shards"
    build_shards([InputSpec(path=ct_dir / "abdomen_dicom", dataset="abdomen-dicom"),
                  InputSpec(path=ct_dir / "abdomen_pelvis_ct.nii.gz", dataset="abdomen-pelvis")],
                 out, spacing=1.5, workers=0, progress=False)
    return out / "manifest.json"


@pytest.fixture(scope="session")
def failure_free(sample_shards, ray_cluster, tmp_path_factory):
    """The reference: the drill config trained with no failure, on the session's Ray."""
    from mim_scale.config import load_config
    from mim_scale.launcher.ray_train import pretrain

    storage = tmp_path_factory.mktemp("runs-reference")
    result = pretrain(load_config("tiny", drill_overrides(sample_shards, storage, "reference")))
    assert result.error is None, result.error
    return result


@pytest.fixture
def child_env(tmp_path):
    """Environment for a child process that starts its own Ray (private RAY_TMPDIR, removed afterwards)."""
    import shutil

    env = subprocess_env(tmp_path)
    yield env
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
