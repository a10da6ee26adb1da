"""Node-loss drill, run as its own process (it owns a multi-node ``ray.cluster_utils.Cluster``, which must
never share a process with the test session's Ray):

    python node_loss_drill.py SHARDS STORAGE NAME elastic|wait

A head node with no CPUs (driver and controller only) and two 1-CPU "nodes", one training worker each.
Once a checkpoint is committed, the node holding rank 1 is removed without warning.
``elastic`` (``--workers 1,2``): the run continues on the node that remains.
``wait`` (fixed 2 workers): the run waits with no capacity; a new node joins after a pause; the run resumes.
Prints one JSON line: what the checks need (the test reads the run folder for the rest).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from launcher_drills import drill_overrides
from mim_scale.config import load_config
from mim_scale.launcher.ray_train import pretrain
from mim_scale.launcher.runs import committed_checkpoint

STEPS = 10
PAUSE_S = 8.0


def main(shards: str, storage: str, name: str, mode: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 128 * 2**20})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=96 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    overrides = drill_overrides(Path(shards), Path(storage), name, steps=STEPS) + [f"launch.address={cluster.address}"]
    if mode == "elastic":
        overrides.append("launch.min_workers=1")
    cfg = load_config("tiny", overrides)
    outcome: dict = {}
    trainer = threading.Thread(target=lambda: outcome.update(result=pretrain(cfg)), daemon=True)
    trainer.start()
    run_dir = Path(storage) / name
    deadline = time.monotonic() + 600
    while committed_checkpoint(str(run_dir)) is None:
        if time.monotonic() > deadline or not trainer.is_alive():
            raise SystemExit(f"no checkpoint committed: {outcome}")
        time.sleep(0.5)
    holder = json.loads((run_dir / "workers" / "rank-1.json").read_text())["node_id"]
    victim = next(n for n in nodes if n.node_id == holder)
    removed_step = json.loads((run_dir / "history.jsonl").read_text().splitlines()[-1])["step"]
    cluster.remove_node(victim, allow_graceful=False)
    report = {"removed_node": holder, "removed_after_step": removed_step, "mode": mode}
    if mode == "wait":
        time.sleep(PAUSE_S)
        report["step_while_waiting"] = json.loads((run_dir / "history.jsonl").read_text().splitlines()[-1])["step"]
        cluster.add_node(num_cpus=1, object_store_memory=96 * 2**20)
    trainer.join(timeout=900)
    result = outcome.get("result")
    report.update(finished=result is not None and result.error is None,
                  error=None if result is None else repr(result.error),
                  checkpoint=None if result is None or result.checkpoint is None else str(result.checkpoint))
    ray.shutdown()
    cluster.shutdown()
    return report


if __name__ == "__main__":
    print("DRILL " + json.dumps(main(*sys.argv[1:5])), flush=True)
    sys.exit(0)
