"""ZeRO memory: peak RSS per worker, ZeRO-3 against ZeRO-0 measured side by side (2 CPU workers, gloo).

    OMP_NUM_THREADS=1 python benchmarks/zero_memory.py            # large (304M), 64^3 crops, as shipped; ~7 min
    OMP_NUM_THREADS=1 python benchmarks/zero_memory.py --set train.cpu_mmap_threshold_mib=0  # glibc's default
    OMP_NUM_THREADS=1 python benchmarks/zero_memory.py --config tiny --crop 32 --view 16   # wiring, ~1 min

The product's own path, in fresh processes per stage: ``deepspeed_engine.build_model`` (under ZeRO-3 the
model is built inside ``deepspeed.zero.Init``), ``build_engine`` (the shipped DeepSpeed config and torch
AdamW), ``--steps`` optimizer steps of the MiM model on random crops of ``--crop`` (memory depends on their
shape, not their content; 64^3 crops with 32^3 views keep the step short on a CPU, so parameters and
optimizer state dominate as they do at full crop size on a GPU), then one checkpoint through
``checkpoint.save`` (DeepSpeed's files and the streamed ``full_state.safetensors``).

Printed, one JSON line: per rank, peak RSS (VmHWM) after the steps and after the save, the growth over the
RSS once the process group is up, the peak of live heap bytes (glibc ``mallinfo2``, sampled every 5 ms:
what the tensors needed, without what the allocator kept), what the rank holds after the steps (module
parameter elements, fp32 master elements, AdamW state elements) against the model's parameter count,
and the ratios ZeRO-3 / ZeRO-0 of the peaks. Needs ~16 bytes per parameter per rank for ZeRO-0: check
``free -g`` first (large: ~6 GiB per rank). The machine must be quiet for the numbers to mean much.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def _status_mib() -> dict[str, float]:
    """VmRSS and VmHWM of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


class _LiveHeap:
    """Peak of glibc's in-use bytes (arena chunks in use + mmapped chunks), sampled by a thread."""

    class _Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    def __init__(self, period_s: float = 0.005):
        self.peak_mib = 0.0
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.mallinfo2.restype = self._Info
        except (OSError, AttributeError):  # not glibc >= 2.33: no live-heap figure
            self._libc = None
            return
        threading.Thread(target=self._run, args=(period_s,), daemon=True).start()

    def now_mib(self) -> float | None:
        if self._libc is None:
            return None
        info = self._libc.mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20

    def _run(self, period_s: float) -> None:
        while True:
            self.peak_mib = max(self.peak_mib, self.now_mib())
            time.sleep(period_s)


def _worker(rank: int, world: int, port: int, stage: int, args: dict, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    from mim_scale.config import load_config
    from mim_scale.engine import checkpoint as ckpt
    from mim_scale.engine import deepspeed_engine
    from mim_scale.engine.deepspeed_engine import build_engine, build_model, init_distributed

    without = set(args["without"])
    if "config" in without:  # DeepSpeed's defaults for the ZeRO-3 live / reuse windows, sub-groups, reduce bucket
        deepspeed_engine.ZERO3_MEMORY.clear()
        deepspeed_engine.ZERO3_MEMORY["reduce_bucket_size"] = 5e7  # the engine's value before
    cfg = load_config(args["config"], [f"train.zero_stage={stage}", f"data.crop_size={args['crop']}",
                                       f"model.view_size={args['view']}", "train.micro_batch=1", "train.grad_accum=1",
                                       f"train.global_batch_crops={world}", "train.steps=100", "train.warmup_steps=1",
                                       "metrics.enabled=false"] + args["set"])
    mmap_threshold = deepspeed_engine.cpu_mmap_threshold_bytes(cfg)
    fixed = init_distributed(False, mmap_threshold)  # as engine/startup does: the config's glibc mmap threshold
    live = _LiveHeap()
    start = _status_mib()["VmRSS"]
    torch.manual_seed(cfg.train.seed)
    if "zero_init" in without:  # built whole, partitioned by deepspeed.initialize
        from mim_scale.engine.sync_bn import convert_sync_batchnorm
        from mim_scale.model import build_model as build_whole

        model = convert_sync_batchnorm(build_whole(cfg))
    else:
        model = build_model(cfg, world)
    engine, optimizer, _scheduler = build_engine(cfg, model, world)
    params = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    t0 = time.perf_counter()
    for step in range(args["steps"]):
        crops = torch.rand(1, cfg.model.in_channels, cfg.data.crop_size, cfg.data.crop_size, cfg.data.crop_size)
        result = engine(crops, generator=torch.Generator().manual_seed(1000 * step + rank), progress=0.0)
        engine.backward(result["total"])
        engine.step()
    step_s = (time.perf_counter() - t0) / max(1, args["steps"])
    after_steps = _status_mib()
    live_after_steps = live.peak_mib
    held = _held_elements(engine)
    save_dir = Path(out) / "ckpt"
    t0 = time.perf_counter()
    ckpt.save(engine, save_dir, ckpt.TrainState(step=args["steps"], world_size=world), rank)
    save_s = time.perf_counter() - t0
    after_save = _status_mib()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "params": params, "start_rss_mib": start, "peak_rss_steps_mib": after_steps["VmHWM"],
        "rss_after_steps_mib": after_steps["VmRSS"], "peak_rss_with_save_mib": after_save["VmHWM"],
        "live_heap_peak_steps_mib": live_after_steps, "live_heap_peak_with_save_mib": live.peak_mib,
        "step_s": step_s, "save_s": save_s, "held_elements": held,
        "mmap_threshold_mib": mmap_threshold / 2**20 if fixed else 0.0,
        "full_state_bytes": (save_dir / "full_state.safetensors").stat().st_size if rank == 0 else None}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _held_elements(engine) -> dict[str, int]:
    """Elements this rank holds: module parameter data, fp32 masters, AdamW state (moments)."""
    from mim_scale.engine.full_state import _base_optimizer

    wrapper = engine.optimizer
    masters = 0
    for key in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat"):
        for t in getattr(wrapper, key, None) or []:
            masters += t.numel()
    base = _base_optimizer(engine)
    state = sum(v.numel() for s in base.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step")
    if not masters:  # torch AdamW stepping the module's own fp32 parameters
        masters = sum(p.numel() for g in base.param_groups for p in g["params"])
    return {"module_params": sum(p.numel() for p in engine.module.parameters()), "fp32_masters": masters,
            "adamw_state": state}


def run_stage(stage: int, args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    from mim_scale.engine.local import free_port

    out = tempfile.mkdtemp(prefix=f"mim-bench-zero{stage}-", dir=args.workdir)
    try:
        mp.start_processes(_worker, args=(2, free_port(), stage, {"config": args.config, "crop": args.crop,
                                                                  "view": args.view, "steps": args.steps,
                                                                  "set": args.set, "without": args.without}, out),
                           nprocs=2, start_method="spawn")
        return {"ranks": [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarise(runs: dict[int, dict]) -> dict:
    """The JSON record: per stage and rank, then the ZeRO-3 / ZeRO-0 ratios of the worst rank's peaks."""
    def col(stage: int, key: str, nd: int = 1) -> list:
        return [None if r[key] is None else round(r[key], nd) for r in runs[stage]["ranks"]]

    record: dict = {"bench": "zero_memory", "world": 2, "params": next(iter(runs.values()))["ranks"][0]["params"]}
    for stage in sorted(runs):
        ranks = runs[stage]["ranks"]
        record[f"zero{stage}"] = {
            "peak_rss_steps_mib": col(stage, "peak_rss_steps_mib"),
            "peak_rss_with_save_mib": col(stage, "peak_rss_with_save_mib"),
            "start_rss_mib": col(stage, "start_rss_mib"),
            "rss_after_steps_mib": col(stage, "rss_after_steps_mib"),
            "live_heap_peak_steps_mib": col(stage, "live_heap_peak_steps_mib"),
            "live_heap_peak_with_save_mib": col(stage, "live_heap_peak_with_save_mib"),
            "held_elements_over_params": [{k: round(v / r["params"], 3) for k, v in r["held_elements"].items()}
                                          for r in ranks],
            "step_s": col(stage, "step_s", 2), "save_s": col(stage, "save_s", 2),
            "full_state_bytes": ranks[0]["full_state_bytes"],
            "mmap_threshold_mib": ranks[0]["mmap_threshold_mib"],  # 0: glibc's dynamic default (or the environment's)
        }
    if 0 in runs and 3 in runs:
        for key in ("peak_rss_steps_mib", "peak_rss_with_save_mib", "live_heap_peak_steps_mib"):
            worst = {s: max(r[key] for r in runs[s]["ranks"]) for s in (0, 3)}
            record[f"ratio_zero3_over_zero0_{key.removesuffix('_mib')}"] = round(worst[3] / worst[0], 3)
        growth = {s: max(r["peak_rss_with_save_mib"] - r["start_rss_mib"] for r in runs[s]["ranks"]) for s in (0, 3)}
        record["ratio_zero3_over_zero0_growth_with_save"] = round(growth[3] / growth[0], 3)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/zero_memory.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="large", help="shipped config name or TOML path (default large, 304M)")
    parser.add_argument("--crop", type=int, default=64, help="crop side, voxels")
    parser.add_argument("--view", type=int, default=32, help="view side, voxels (model.view_size)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run (2: the second runs with "
                                                             "DeepSpeed's recorded parameter trace)")
    parser.add_argument("--stages", default="0,3", help="ZeRO stages, comma-separated (the ratio needs 0 and 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--without", default="", type=lambda v: [w for w in v.split(",") if w],
                        help="undo fixes, comma-separated, to measure what each saves: config (DeepSpeed's ZeRO-3 "
                             "defaults), zero_init (model built whole); the allocator fix with --set "
                             "train.cpu_mmap_threshold_mib=0. The streamed full-state save cannot be undone")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: the system temp dir)")
    args = parser.parse_args(argv)
    unknown = set(args.without) - {"config", "zero_init"}
    if unknown:
        parser.error(f"--without: unknown {sorted(unknown)}")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mim-scale" / "torch_extensions"))
    runs = {stage: run_stage(stage, args) for stage in (int(s) for s in args.stages.split(","))}
    record = summarise(runs)
    record.update({"config": args.config, "crop": args.crop, "view": args.view, "steps": args.steps,
                   "overrides": args.set, "without": args.without})
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
