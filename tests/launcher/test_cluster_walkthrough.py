"""docs/CLUSTER.md, "to try the same thing on one CPU machine", as a new user would type it: a head and
two worker nodes from `ray start`, shards built on that cluster with `mim-scale shards build --address`,
pre-training on it with `mim-scale pretrain --address`, then `mim-scale status`.

The cluster lives in a private RAY_TMPDIR and its processes in their own sessions, which the test
kills at the end (`ray stop` would stop every Ray on the machine, other people's too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mim_scale.engine import checkpoint as ckpt
from mim_scale.engine.local import free_port

from launcher_drills import PYTHON

RAY = str(Path(PYTHON).parent / "ray")


def _wait_nodes(address: str, n: int, env: dict, timeout: float = 180) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([PYTHON, "-c", probe, address], env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1] == str(n):
            return
        time.sleep(1)
    raise AssertionError(f"the cluster at {address} never had {n} nodes")


@pytest.mark.slow
def test_local_multi_node_cluster_as_documented(ct_dir, tmp_path, child_env):
    # a `ray start` cluster has token authentication on; every process that joins it must say so (the
    # token itself is in ~/.ray/auth_token, written by the head)
    env = dict(child_env, RAY_AUTH_MODE="token")
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = [subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                               "--block"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_nodes(address, 1, env)
        for n in (2, 3):  # one at a time, as the documented loop does: nodes starting together race for ports
            nodes.append(subprocess.Popen([RAY, "start", f"--address={address}", "--num-cpus=1", "--block"], env=env,
                                          start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_nodes(address, n, env)

        shards = tmp_path / "shards"
        built = subprocess.run([PYTHON, "-m", "mim_scale.cli", "shards", "build", str(ct_dir / "abdomen_dicom"),
                                str(ct_dir / "abdomen_pelvis_ct.nii.gz"), "--out", str(shards), "--address", address,
                                "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
        assert built.returncode == 0, built.stderr[-3000:]
        manifest = json.loads((shards / "manifest.json").read_text())
        assert sum(s["samples"] for s in manifest["shards"]) == 2

        argv = [PYTHON, "-m", "mim_scale.cli", "pretrain", "--json", "--config", "tiny", "--address", address,
                "--workers", "2", "--name", "try2", "--storage", str(tmp_path / "runs"), "--set", f"data.shards={shards}",
                "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--env", "MIM_SCALE_DRILL_MARK=1"]
        trained = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        assert trained.returncode == 0, trained.stderr[-3000:]
        out = json.loads(trained.stdout[trained.stdout.index("{"):])
        state = ckpt.TrainState.read(Path(out["checkpoint"]))
        assert (state.step, state.world_size, state.samples_seen) == (4, 2, 8)

        run_dir = tmp_path / "runs" / "try2"
        records = [json.loads(p.read_text()) for p in sorted((run_dir / "workers").glob("rank-*.json"))]
        assert len({r["node_id"] for r in records}) == 2  # one worker on each 1-CPU node
        assert all({"MIM_SCALE_DRILL_MARK", "DS_ACCELERATOR"} <= set(r["env"]) for r in records)  # runtime_env
        status = subprocess.run([PYTHON, "-m", "mim_scale.cli", "status", str(run_dir), "--json"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert (shown["state"], shown["step"], shown["checkpoint"]["step"]) == ("finished", 4, 4)
        assert shown["driver"]["address"] == address
    finally:
        for proc in reversed(nodes):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in reversed(nodes):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
