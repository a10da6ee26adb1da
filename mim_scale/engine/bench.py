"""Engine benchmarks, each printing its figures and the ratio against a baseline measured side by side::

    python -m mim_scale.engine.bench data   [--phantoms 1 --phantom-shape 150,256,256 --crop 96 --k 2]
    python -m mim_scale.engine.bench wait   [--steps 20]
    python -m mim_scale.engine.bench memory [--width 2048 --layers 4]

data: crops/s on one core of our shard stream against MONAI's uncached ``LoadImaged + Orientationd +
    ScaleIntensityRanged + SpatialPadd + RandSpatialCropSamplesd`` over NIfTI and against MONAI's
    ``PersistentDataset`` (cold pass, then warm pass with its cache misses counted), the same k crops per
    volume read on every side, and the bytes on disk each needs. Inputs: the real CT
    (``MIM_SCALE_SAMPLE_DATA``) plus ``shards synth`` phantoms at 0.8 x 0.8 x 1.5 mm. The MONAI pipelines
    keep the native grid (no Spacingd); our shards are built at ``--spacing`` (1.5 mm), so ours also did the
    resampling, once, at build time.
wait: fraction of step time a 2-worker tiny run (2 processes, gloo) spends waiting for data.
memory: peak RSS per worker, ZeRO-0 against ZeRO-3 (model built whole, then partitioned by initialize, as
    the engine does; and built under ``deepspeed.zero.Init``), 2 workers, on an MLP whose parameters and
    AdamW state dominate memory (fp32).
Figures go to stdout as JSON lines; the machine must be quiet for the numbers to mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- (a) data ----------------------------------------------------------------------------------------
def bench_data(args) -> dict:
    from mim_scale.config import DataConfig
    from mim_scale.data.stream import CropStream, manifest_shards
    from mim_scale.shards.builder import build_shards
    from mim_scale.shards.synth import phantom, write_nifti

    ct = Path(os.environ.get("MIM_SCALE_SAMPLE_DATA", "/work/shared/data/ct"))
    work = Path(tempfile.mkdtemp(prefix="mim-bench-data-", dir=args.workdir))
    try:
        niftis = [ct / "abdomen_pelvis_ct.nii.gz"]
        shape = tuple(int(x) for x in args.phantom_shape.split(","))
        for i in range(args.phantoms):
            niftis.append(write_nifti(phantom(shape, seed=i), work / f"phantom{i}.nii.gz", spacing=(0.8, 0.8, 1.5)))
        source_bytes = sum(p.stat().st_size for p in niftis)
        report = build_shards([str(p) for p in niftis], work / "shards", spacing=args.spacing, workers=0,
                              progress=False, codec=args.codec)
        raw_int16 = 2 * report.voxels
        k, size, passes = args.k, args.crop, args.passes
        n_vol = len(niftis)

        # ours: one process = one core
        cfg = DataConfig(shards=str(work / "shards"), crop_size=size, crops_per_volume=k, shuffle_buffer=1,
                         num_workers=0, seed=0)
        stream = iter(CropStream(cfg, manifest_shards(cfg)))
        next(stream)  # imports and first open outside the timing
        n = passes * n_vol * k
        t0 = time.perf_counter()
        for _ in range(n):
            next(stream)
        ours = n / (time.perf_counter() - t0)

        from monai.data import Dataset, PersistentDataset
        from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, Orientationd, RandSpatialCropSamplesd,
                                      ScaleIntensityRanged, SpatialPadd)

        det = [LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), Orientationd(keys="image", axcodes="RAS"),
               ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
               SpatialPadd(keys="image", spatial_size=(size,) * 3)]
        rand = [RandSpatialCropSamplesd(keys="image", roi_size=(size,) * 3, num_samples=k, random_size=False)]
        items = [{"image": str(p)} for p in niftis]

        def run(ds, n_passes: int = passes) -> float:
            crops = 0
            t0 = time.perf_counter()
            for _ in range(n_passes):
                for i in range(len(ds)):
                    crops += len(ds[i])
            return crops / (time.perf_counter() - t0)

        uncached = run(Dataset(items, Compose(det + rand)))

        misses = {"n": 0}

        class CountingPersistentDataset(PersistentDataset):
            """Counts the deterministic pre-transforms it actually recomputes (cache misses)."""

            def _pre_transform(self, item_transformed):
                misses["n"] += 1
                return super()._pre_transform(item_transformed)

        cache = work / "persistent_cache"
        pds = CountingPersistentDataset(items, Compose(det + rand), cache_dir=cache)
        cold = run(pds, 1)
        cold_misses, misses["n"] = misses["n"], 0
        warm = run(pds)
        record = {
            "bench": "data", "codec": args.codec, "volumes": n_vol, "phantom_shape": shape, "crop": size, "k": k, "passes": passes,
            "crops_per_s_per_core": {"ours_shards": round(ours, 2), "monai_uncached": round(uncached, 2),
                                     "monai_persistent_cold": round(cold, 2), "monai_persistent_warm": round(warm, 2)},
            "ratio_vs_uncached": round(ours / uncached, 2), "ratio_vs_persistent_warm": round(ours / warm, 2),
            "persistent_cache_misses": {"cold_pass": cold_misses, "warm_pass": misses["n"]},
            "bytes": {"nifti_sources": source_bytes, "our_shards": report.shard_bytes, "raw_int16_at_shard_spacing": raw_int16,
                      "persistent_cache": _dir_bytes(cache)},
            "shards_vs_raw_int16": round(report.shard_bytes / raw_int16, 3),
            "persistent_cache_vs_sources": round(_dir_bytes(cache) / source_bytes, 2),
            "torch_threads": torch.get_num_threads(),
        }
        _emit(record)
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- (b) data wait ------------------------------------------------------------------------------------
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
        _emit(record)
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- (c) memory ---------------------------------------------------------------------------------------
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
    _emit(record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mim_scale.engine.bench", description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=("data", "wait", "memory"))
    parser.add_argument("--workdir", default=None, help="scratch folder (default: the system temp dir)")
    parser.add_argument("--phantoms", type=int, default=1)
    parser.add_argument("--phantom-shape", default="150,256,256", help="D,H,W of each phantom (issue: 300,512,512)")
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--codec", default="npy.gz", choices=("npy.gz", "npy"), help="shard codec (data)")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--k", type=int, default=2, help="crops per volume read, both sides")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (wait)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mim-scale" / "torch_extensions"))
    torch.set_num_threads(1)
    {"data": bench_data, "wait": bench_wait, "memory": bench_memory}[args.which](args)


if __name__ == "__main__":
    main()
