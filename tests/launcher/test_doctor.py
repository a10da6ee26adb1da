"""`mim-scale doctor` on the session's local Ray cluster: the head checked here, every node by a Ray task
pinned to it; a ready setup exits 0, each thing that would stop a run is a FIX line naming it and exits 1."""

from __future__ import annotations

import json

import pytest

from mim_scale.cli import main
from mim_scale.config import load_config
from mim_scale.doctor import FIX, OK, check_cluster, check_here, spec_from


def _levels(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        out.setdefault(f.what, set()).add(f.level)
    return out


def test_a_ready_setup_on_every_node(ray_cluster, sample_shards, tmp_path):
    spec = spec_from(load_config("tiny", [f"data.shards={sample_shards}"]), str(tmp_path / "runs"), min_free_gb=0.01)
    reports = check_cluster(spec, prometheus_url=None)
    ray = ray_cluster
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert [r.role for r in reports] == ["head"] + ["node"] * len(alive)
    for r in reports:
        assert not r.blocking, r
        levels = _levels(r)
        for what in ("torch", "deepspeed", "storage", "shards"):
            assert levels[what] == {OK}, (what, r.findings)
        assert not list((tmp_path / "runs").iterdir())  # the write probe is gone
    assert "prometheus" in _levels(reports[0]) and "prometheus" not in _levels(reports[1])
    assert alive[0]["NodeManagerAddress"] in reports[1].node  # named by its IP
    assert sorted(r.ray_node_id for r in reports[1:]) == sorted(n["NodeID"] for n in alive)  # and ran there


def test_what_blocks_a_run_is_named_per_node_and_exits_1(ray_cluster, sample_shards, tmp_path, capsys):
    # a manifest whose first shard is gone, a storage path under a file, and more free space than exists
    broken = tmp_path / "shards"
    broken.mkdir()
    manifest = json.loads(sample_shards.read_text())
    (broken / "manifest.json").write_text(json.dumps(manifest))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = main(["doctor", "--config", "tiny", "--set", f"data.shards={broken / 'manifest.json'}",
               "--storage", str(blocker / "runs"), "--json"])
    reports = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert len(reports) >= 2 and all(r["blocking"] for r in reports)
    for r in reports:
        found = {f["what"]: f for f in r["findings"] if f["level"] == FIX}
        assert "cannot create it" in found["storage"]["message"] and str(blocker) in found["storage"]["message"]
        assert "does not open from this node" in found["shards"]["message"]

    rc = main(["doctor", "--config", "tiny", "--set", f"data.shards={sample_shards}", "--storage", str(tmp_path),
               "--min-free-gb", "1e9"])
    out = capsys.readouterr().out
    assert rc == 1 and "under the 1e+09 GiB asked for" in out and "need fixing before a run" in out

    rc = main(["doctor", "--config", "tiny", "--set", f"data.shards={sample_shards}", "--storage", str(tmp_path),
               "--min-free-gb", "0.01"])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip().endswith("machine(s) ready"), out


def test_use_gpu_on_a_cpu_build_is_a_fix(sample_shards, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = load_config("tiny", [f"data.shards={sample_shards}", "launch.use_gpu=true"])
    report = check_here(spec_from(cfg, str(tmp_path), min_free_gb=0.01), ray_gpus=8.0)
    gpu = [f for f in report.findings if f.what == "gpus"]
    assert report.blocking and gpu and all(f.level == FIX for f in gpu)
    assert any("Ray counts 8 GPU(s)" in f.message for f in gpu)
    # FusedAdam is not prebuilt in this install: it would be JIT-compiled, and that is said
    ds = [f for f in report.findings if f.what == "deepspeed"]
    assert any("fused_adam" in f.message for f in ds), ds


MULTI_NODE = """
import json, sys
from ray.cluster_utils import Cluster
import ray
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                        "object_store_memory": 128 * 2**20})
for _ in range(2):
    cluster.add_node(num_cpus=1, object_store_memory=96 * 2**20)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
from mim_scale.config import load_config
from mim_scale.doctor import check_cluster, spec_from
spec = spec_from(load_config("tiny", ["data.shards=" + sys.argv[1]]), sys.argv[2], min_free_gb=0.01)
reports = check_cluster(spec)
alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
print("RESULT", json.dumps({"alive": alive, "ran_on": sorted(r.ray_node_id for r in reports[1:]),
                            "blocking": [r.blocking for r in reports], "roles": [r.role for r in reports]}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_every_node_of_a_multi_node_cluster_is_checked_where_it_runs(sample_shards, tmp_path, child_env):
    import subprocess

    from launcher_drills import PYTHON

    out = subprocess.run([PYTHON, "-c", MULTI_NODE, str(sample_shards), str(tmp_path / "runs")], env=child_env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert len(result["alive"]) == 3  # a head with no CPU and two 1-CPU nodes
    assert result["ran_on"] == result["alive"]  # one check per node, pinned there (the CPU-less head included)
    assert result["roles"] == ["head", "node", "node", "node"] and not any(result["blocking"])


def test_a_stale_build_lock_is_a_fix_naming_it(sample_shards, tmp_path, monkeypatch):
    """A process killed while torch JIT-builds an op leaves its lock; every later process waits on it for ever."""
    import os

    from mim_scale.doctor import STALE_BUILD_LOCK_S, WARN

    root = tmp_path / "torch_extensions"
    stale = root / "deepspeed_shm_comm" / "lock"
    fresh = root / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = stale.stat().st_mtime - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    report = check_here(spec_from(load_config("tiny", [f"data.shards={sample_shards}"]), str(tmp_path),
                                  min_free_gb=0.01))
    ds = [f for f in report.findings if f.what == "deepspeed"]
    assert report.blocking
    assert any(f.level == FIX and str(stale) in f.message and "shm_comm" in f.message for f in ds), ds
    assert any(f.level == WARN and str(fresh) in f.message for f in ds), ds  # a build may be running
    import deepspeed.ops

    if deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"):  # a CPU run builds it in init_distributed
        assert any("deepspeed_shm_comm" in f.message and "JIT-compiled" in f.message for f in ds), ds
    stale.unlink()
    fresh.unlink()
    report = check_here(spec_from(load_config("tiny", [f"data.shards={sample_shards}"]), str(tmp_path),
                                  min_free_gb=0.01))
    assert not report.blocking and not any(str(root) in f.message for f in report.findings)
