"""ZeRO memory: peak RSS per worker, ZeRO-3 against ZeRO-0 measured side by side (2 CPU workers, gloo).

    OMP_NUM_THREADS=1 python benchmarks/zero_memory.py --width 2048 --layers 4    # CPU, ~1 min
    OMP_NUM_THREADS=1 python benchmarks/zero_memory.py --width 4096 --layers 4    # 67.1 M parameters

An MLP whose parameters and AdamW state dominate memory (fp32), 3 steps per run, each stage in fresh
processes: ZeRO-0 (the baseline), ZeRO-3 with the model built whole and partitioned by ``initialize`` (as
the engine does), and ZeRO-3 built under ``deepspeed.zero.Init``. Printed: per-rank peak RSS, growth over
the start, and the ratio of ZeRO-0's growth to each ZeRO-3 variant's; one JSON line on stdout. The
machine must be quiet for the numbers to mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def _memory_worker(rank: int, world: int, port: int, stage: int, width: int, layers: int, out: str,
                   zero_init: bool = False) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4 * world,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if stage:
        # buckets sized like the engine's (deepspeed_engine.deepspeed_config), well below one layer's numel
        config["zero_optimization"].update({"reduce_bucket_size": 5e6, "allgather_bucket_size": 5e6,
                                            "stage3_prefetch_bucket_size": 5e6, "stage3_max_live_parameters": 2e7,
                                            "stage3_param_persistence_threshold": 1e4, "overlap_comm": False})
    if zero_init:  # parameters partitioned as they are created: no rank ever holds the full model
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        params = sum(p.ds_numel for p in model.parameters())
    else:
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    for _ in range(3):
        x = torch.randn(4, width)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import gc

    gc.collect()
    now = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_rss": peak, "base_rss": base, "params": params,
                                                         "rss_after_steps": now}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def bench_memory(args) -> dict:
    import torch.multiprocessing as mp

    from mim_scale.engine.local import free_port

    record = {"bench": "memory", "world": 2, "precision": "fp32"}
    for name, stage, zero_init in (("zero0", 0, False), ("zero3", 3, False), ("zero3_init", 3, True)):
        out = tempfile.mkdtemp(prefix="mim-bench-mem-", dir=args.workdir)
        mp.start_processes(_memory_worker, args=(2, free_port(), stage, args.width, args.layers, out, zero_init),
                           nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
        shutil.rmtree(out, ignore_errors=True)
        record["params"] = ranks[0]["params"]
        record[name] = {"peak_rss_mib": [round(r["peak_rss"] / 2**20, 1) for r in ranks],
                                  "growth_over_start_mib": [round((r["peak_rss"] - r["base_rss"]) / 2**20, 1) for r in ranks],
                                  "rss_after_steps_mib": [round(r["rss_after_steps"] / 2**20, 1) for r in ranks]}
    record["param_plus_adam_fp32_mib"] = round(record["params"] * 16 / 2**20, 1)  # weights, grads, 2 moments
    for name in ("zero3", "zero3_init"):
        record[f"ratio_zero0_over_{name}_growth"] = round(np.mean(record["zero0"]["growth_over_start_mib"])
                                                          / max(1e-9, np.mean(record[name]["growth_over_start_mib"])), 2)
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/zero_memory.py", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: the system temp dir)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mim-scale" / "torch_extensions"))
    torch.set_num_threads(1)
    bench_memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
