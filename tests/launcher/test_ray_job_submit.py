"""Inside a submitted Ray job (`ray job submit -- mim-scale pretrain ...`), the driver joins the job's cluster
instead of starting a private local one; outside a job it starts its own (a RAY_ADDRESS exported for the jobs
CLI is not a request to join)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mim_scale.config import load_config
from mim_scale.engine.local import free_port
from mim_scale import ray_session
from mim_scale.launcher import cluster

from launcher_drills import PYTHON

RAY = str(Path(PYTHON).parent / "ray")
JOB_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@pytest.fixture
def captured_init(monkeypatch):
    """ray.init recorded instead of run (the decision under test is which address ensure_ray passes)."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for var in (JOB_VAR, "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_a_job_driver_joins_its_cluster(captured_init, monkeypatch):
    # what Ray's job supervisor sets for a driver: the job's runtime_env as JSON, the cluster's GCS address
    monkeypatch.setenv(JOB_VAR, json.dumps({"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "3"}}, "metadata": {}}))
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert cluster.ensure_ray(load_config("tiny"))
    (call,) = captured_init
    assert call["address"] == "10.1.2.3:6379" and "num_cpus" not in call
    # Ray refuses a driver runtime_env that sets a variable the job's sets: the job's value wins
    assert "OMP_NUM_THREADS" not in call["runtime_env"]["env_vars"]
    assert call["runtime_env"]["env_vars"]["MIM_SCALE_LOG"]


def test_an_explicit_address_still_wins_in_a_job(captured_init, monkeypatch):
    monkeypatch.setenv(JOB_VAR, "{}")
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    cluster.ensure_ray(load_config("tiny", ["launch.address=ray://other:10001"]))
    assert captured_init[0]["address"] == "ray://other:10001"


@pytest.mark.parametrize("env", [{}, {"RAY_ADDRESS": "http://head:8265"}, {"RAY_ADDRESS": "10.1.2.3:6379"}])
def test_outside_a_job_a_private_cluster_starts(captured_init, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cluster.ensure_ray(load_config("tiny"))
    assert captured_init[0]["address"] == "local"


def test_a_job_without_a_usable_address_joins_auto(captured_init, monkeypatch):
    monkeypatch.setenv(JOB_VAR, "not json")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    cluster.ensure_ray(load_config("tiny"))
    assert captured_init[0]["address"] == "auto"
    assert ray_session.submitted_job_env_vars() == set()


@pytest.mark.slow
def test_ray_job_submit_driver_joins_the_head(child_env, tmp_path):
    """End to end: `ray start --head` with its dashboard, `ray job submit` a driver that calls ensure_ray; the
    driver's Ray session is the head's (same GCS address and session), not a new local one."""
    port, dash, agent = free_port(), free_port(), free_port()  # the agent's default 52365 may be another Ray's
    env = dict(child_env)
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}", "--block"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = ("import ray; from mim_scale.config import load_config; from mim_scale.launcher.cluster import "
                 "ensure_ray; ensure_ray(load_config('tiny')); c = ray.get_runtime_context(); "
                 "print('JOINED', c.gcs_address, len(ray.nodes()))")
        deadline = time.monotonic() + 240
        while True:  # the dashboard's job server comes up a few seconds after the head
            out = subprocess.run([RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
                                  PYTHON, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        joined = [line for line in out.stdout.splitlines() if line.startswith("JOINED")]
        assert joined and joined[0].split()[1].endswith(f":{port}"), out.stdout[-2000:]
        assert joined[0].split()[2] == "1"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
