"""Shared fixtures: the real sample CT, one local Ray cluster, and moto's S3 server on loopback.

The sample CT comes from ``MIM_SCALE_SAMPLE_DATA`` (CI points it at the shared copy), else from the
project's own ``mim-scale sample-data`` fetch into a cache folder.
"""

from __future__ import annotations

import logging
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
    from mim_scale.launcher.cluster import ensure_ray

    started = ensure_ray(load_config("tiny", ["launch.ray_num_cpus=2"]))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on a loopback port; yields the boto3 environment for it."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    from mim_scale.engine.local import free_port

    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def logged():
    """``logged(name)`` -> the records of logger ``name`` from then on (``.records``, ``.text``), caught on that
    logger itself: unlike caplog's root handler, independent of what earlier in-process runs of the CLI did to
    the root logger's handlers (a whole-suite run lost caplog records that way; not yet explained)."""
    attached = []

    def catch(name: str, level: int = logging.WARNING) -> _Records:
        logger = logging.getLogger(name)
        handler = _Records()
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(level)
        return handler

    yield catch
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)
