"""Shared fixtures: the real sample CT, and a scratch directory per session.

The sample CT comes from ``MIM_SCALE_SAMPLE_DATA`` (CI points it at the shared copy), else from the
project's own ``mim-scale sample-data`` fetch into a cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ct_dir(tmp_path_factory) -> Path:
    """Folder with abdomen_dicom/, abdomen_pelvis_ct.nii.gz, the label volumes and labels_total.json."""
    from mim_scale.sample_data import ensure_sample_data

    return ensure_sample_data(cache_dir=Path(os.environ.get("MIM_SCALE_CACHE", Path.home() / ".cache" / "mim-scale")))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (starting one costs seconds; tests share it)."""
    import ray

    from mim_scale.config import load_config
    from mim_scale.launcher.ray_train import ensure_ray

    started = ensure_ray(load_config("tiny", ["launch.ray_num_cpus=2"]))
    yield ray
    if started:
        ray.shutdown()
