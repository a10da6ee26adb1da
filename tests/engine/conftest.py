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
