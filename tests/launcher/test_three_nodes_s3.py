"""Slow: a Ray cluster of 3 nodes on this machine, each on its own loopback address (head 127.0.0.1 with no CPUs,
two 1-CPU nodes on 127.0.0.2 and 127.0.0.3), the run's storage on an S3-compatible server (moto on loopback).
Every rank's metrics target names its own node's address, history, worker records and targets reach the
driver's run folder (./runs/NAME: the storage is a bucket), and `mim-scale monitor` scrapes every rank up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest

from mim_scale.engine.local import free_port

from launcher_drills import PYTHON
from prometheus_server import find_binary
from test_cluster_walkthrough import RAY, _wait_nodes


@pytest.mark.slow
def test_three_loopback_nodes_with_s3_storage(sample_shards, s3_server, tmp_path, child_env):
    import boto3

    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket="mim-runs")
    env = dict(child_env, RAY_AUTH_MODE="token", **s3_server)
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = [subprocess.Popen([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0",
                               "--include-dashboard=false", "--block"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    monitor = None
    try:
        _wait_nodes(address, 1, env)
        for n, ip in ((2, "127.0.0.2"), (3, "127.0.0.3")):
            nodes.append(subprocess.Popen([RAY, "start", f"--address={address}", f"--node-ip-address={ip}",
                                           "--num-cpus=1", "--block"], env=env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_nodes(address, n, env)

        run_dir = tmp_path / "runs" / "s3try"  # the driver's run folder: cwd/runs/NAME for a bucket storage
        argv = [PYTHON, "-m", "mim_scale.cli", "pretrain", "--config", "tiny", "--address", address, "--workers", "2",
                "--name", "s3try", "--storage", "s3://mim-runs/runs", "--set", f"data.shards={sample_shards}",
                "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "metrics.linger_seconds=40"]
        driver = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        up: dict[str, str] = {}  # rank -> instance Prometheus saw up
        prom_port = free_port()

        def watch() -> None:
            nonlocal monitor
            while not run_dir.is_dir() and driver.poll() is None:
                time.sleep(0.5)
            monitor = subprocess.Popen([PYTHON, "-m", "mim_scale.cli", "monitor", str(run_dir), "--port", str(prom_port),
                                        "--prometheus", str(find_binary()), "--scrape-interval", "1s"], env=env,
                                       stdout=subprocess.PIPE, text=True)
            monitor.stdout.readline()
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and len(up) < 2:
                try:
                    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": "up == 1"})
                    for r in json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]:
                        up[r["metric"].get("rank")] = r["metric"]["instance"]
                except OSError:
                    pass
                time.sleep(1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        out, err = driver.communicate(timeout=1200)
        watcher.join(timeout=120)
        assert driver.returncode == 0, err[-3000:]

        history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        assert history[-1]["step"] == 4
        records = {r["rank"]: r for r in (json.loads((run_dir / "workers" / f"rank-{k}.json").read_text()) for k in (0, 1))}
        targets = {k: json.loads((run_dir / "prometheus_targets" / f"rank-{k}.json").read_text())[0]["targets"][0]
                   for k in (0, 1)}
        assert {r["node_ip"] for r in records.values()} == {"127.0.0.2", "127.0.0.3"}  # one worker per node
        for rank, record in records.items():
            assert targets[rank].startswith(record["node_ip"] + ":"), (rank, targets[rank], record)
        assert up == {"0": targets[0], "1": targets[1]}, up  # mim-scale monitor's Prometheus: every rank up
        assert (run_dir / "attempts").read_text() == "1"
    finally:
        if monitor is not None and monitor.poll() is None:
            monitor.terminate()
            monitor.wait(timeout=60)
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
