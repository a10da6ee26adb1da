"""Data wait: the fraction of step time a 2-rank tiny MiM run spends waiting for its loader.

    MIM_SCALE_SAMPLE_DATA=/work/shared/data/ct OMP_NUM_THREADS=1 python benchmarks/data_wait.py --steps 20   # CPU

Tiny MiM on shards of the real CT (3 mm), 2 processes (gloo), ``--loader-workers`` DataLoader workers per
rank; step 1 (loader start-up) is left out. The figure is a fraction of the same run's step time (its own
baseline): per rank, ``sum(data_wait_seconds) / sum(step_seconds)`` and the mean step. One JSON line on
stdout; the machine must be quiet for the numbers to mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def bench_wait(args) -> dict:
    from mim_scale.config import load_config
    from mim_scale.engine.local import launch_local, step_log
    from mim_scale.shards.builder import build_shards

    ct = Path(os.environ.get("MIM_SCALE_SAMPLE_DATA", "/work/shared/data/ct"))
    work = Path(tempfile.mkdtemp(prefix="mim-bench-wait-", dir=args.workdir))
    try:
        build_shards([str(ct / "abdomen_pelvis_ct.nii.gz"), str(ct / "abdomen_dicom")], work / "shards", spacing=3.0,
                     target_shard_bytes=1, workers=0, progress=False)
        cfg = load_config("tiny", [f"data.shards={work / 'shards'}", f"train.steps={args.steps}", "metrics.enabled=false",
                                   "train.checkpoint_every=0", f"data.num_workers={args.loader_workers}"] + args.set)
        launch_local(cfg, work / "run", 2)
        rows = {r: step_log(work / "run", r)[1:] for r in (0, 1)}  # step 1 includes loader start-up
        record = {"bench": "wait", "steps_measured": len(rows[0]), "crop": cfg.data.crop_size,
                  "loader_workers_per_rank": cfg.data.num_workers}
        for r, steps in rows.items():
            wait = sum(s["data_wait_seconds"] for s in steps)
            total = sum(s["step_seconds"] for s in steps)
            record[f"rank{r}"] = {"data_wait_fraction": round(wait / total, 4), "mean_step_s": round(total / len(steps), 4)}
        print(json.dumps(record), flush=True)
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/data_wait.py", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: the system temp dir)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    bench_wait(parser.parse_args(argv))  # the ranks are spawned by launch_local, with its thread and extension settings
    return 0


if __name__ == "__main__":
    sys.exit(main())
