"""Launcher benchmark: Ray start, launch to first step, and restart after a worker is SIGKILLed.

    OMP_NUM_THREADS=1 python benchmarks/launcher_restart.py     # CPU: tiny MiM on the sample CT, 2 workers, ~2 min
    python benchmarks/launcher_restart.py --workers 1 --use-gpu --config base --shards /data/shards/manifest.json

One run, timed from the driver: ``ray.init`` of a local cluster; ``pretrain`` with a ``kill:1:K`` drill.
A thread watches the run's ``history.jsonl`` (rank 0 appends a line per step) and stamps each line as it
lands. Figures:

- ``ray_start_s``: ``ray.init`` of a local cluster (not counted in the others);
- ``launch_to_first_step_s``: ``pretrain()`` called -> step 1 logged (worker group, process group,
  DeepSpeed engine, first batch, first step);
- ``restart_s``: the kill -> the first step after it logged, minus one median step: the time a worker
  loss costs beyond the work that is redone (group teardown, new group, checkpoint load, first batch);
- ratio ``restart / launch``: how much of a cold start a restart costs (a baseline from the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


class HistoryWatch(threading.Thread):
    """Stamps each history line (step) with the monotonic time it was first seen."""

    def __init__(self, path: Path, every: float = 0.02):
        super().__init__(daemon=True)
        self.path, self.every = path, every
        self.lines: list[tuple[float, dict]] = []
        self.done = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.done.is_set():
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                text = ""
            complete = text.splitlines()[: text.count("\n")]
            now = time.perf_counter()
            for line in complete[seen:]:
                self.lines.append((now, json.loads(line)))
            seen = len(complete)
            time.sleep(self.every)


def run_bench(*, config: str, shards: Path, workers: int, use_gpu: bool, steps: int, kill_step: int,
              out: Path, overrides: list[str]) -> dict:
    import ray

    from mim_scale.config import load_config
    from mim_scale.launcher.cluster import ensure_ray
    from mim_scale.launcher.ray_train import pretrain

    interval = max(1, kill_step - 2)
    cfg = load_config(config, [f"data.shards={shards}", f"train.steps={steps}", f"train.checkpoint_every={interval}",
                               f"launch.workers={workers}", f"launch.storage={out}", "launch.name=bench",
                               "metrics.enabled=false", *(["launch.use_gpu=true"] if use_gpu else []), *overrides])
    t0 = time.perf_counter()
    started = ensure_ray(cfg)
    ray_start = time.perf_counter() - t0
    watch = HistoryWatch(out / "bench" / "history.jsonl")
    watch.start()
    try:
        t_launch = time.perf_counter()
        result = pretrain(cfg, fault=f"kill:{min(1, workers - 1)}:{kill_step}")
        total = time.perf_counter() - t_launch
    finally:
        time.sleep(0.1)
        watch.done.set()
        watch.join()
        if started:
            ray.shutdown()
    if result.error is not None:
        raise RuntimeError(f"the benchmark run failed: {result.error}")
    lines = watch.lines
    steps_seen = [h["step"] for _, h in lines]
    first_step = lines[0][0] - t_launch
    back = next(i for i in range(1, len(steps_seen)) if steps_seen[i] <= steps_seen[i - 1])
    before, after = lines[back - 1][0], lines[back][0]
    step_times = [h["step_seconds"] for _, h in lines if h.get("step_seconds")]
    median_step = statistics.median(step_times)
    restart = after - before - median_step
    figures = {"ray_start_s": round(ray_start, 2), "launch_to_first_step_s": round(first_step, 2),
               "restart_s": round(restart, 2), "restart_over_launch": round(restart / first_step, 3),
               "median_step_s": round(median_step, 3), "run_total_s": round(total, 1),
               "workers": workers, "use_gpu": use_gpu, "config": config, "cpu_count": os.cpu_count(),
               "resumed_from_step": steps_seen[back] - 1, "killed_at_step": kill_step}
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/launcher_restart.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--shards", type=Path, default=None, help="manifest.json (default: build from the sample CT)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--kill-step", type=int, default=4, help="rank 1 is SIGKILLed as this step begins")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="mim-launcher-bench-"))).resolve()
    shards = args.shards
    if shards is None:
        from mim_scale.sample_data import ensure_sample_data
        from mim_scale.shards.builder import build_shards
        from mim_scale.shards.inputs import InputSpec

        ct = ensure_sample_data(cache_dir=Path(os.environ.get("MIM_SCALE_CACHE", Path.home() / ".cache" / "mim-scale")))
        build_shards([InputSpec(path=ct / "abdomen_dicom", dataset="abdomen-dicom"),
                      InputSpec(path=ct / "abdomen_pelvis_ct.nii.gz", dataset="abdomen-pelvis")],
                     out / "shards", spacing=1.5, workers=0, progress=False)
        shards = out / "shards" / "manifest.json"
    figures = run_bench(config=args.config, shards=shards, workers=args.workers, use_gpu=args.use_gpu,
                        steps=args.steps, kill_step=args.kill_step, out=out, overrides=args.overrides)
    print(f"Ray start (local cluster)       {figures['ray_start_s']:7.2f} s")
    print(f"launch -> first step            {figures['launch_to_first_step_s']:7.2f} s")
    print(f"restart after a worker SIGKILL  {figures['restart_s']:7.2f} s  "
          f"({figures['restart_over_launch']:.2f} x launch -> first step; resumed from step "
          f"{figures['resumed_from_step']}, median step {figures['median_step_s']:.3f} s)")
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
