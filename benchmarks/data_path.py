"""Data path: crops/s on one core of our shard stream against MONAI's pipelines, measured side by side.

    MIM_SCALE_SAMPLE_DATA=/work/shared/data/ct OMP_NUM_THREADS=1 python benchmarks/data_path.py     # CPU, ~2 min
    OMP_NUM_THREADS=1 python benchmarks/data_path.py --codec npy --crop 192 --phantom-shape 300,512,512 --k 1,2
                                                                                          # the issue's size

Ours (the product path, one process = one core): ``CropStream.batches()``, what a loader worker runs: int16
HU crops cut straight from the shard's memory map into the batch's buffer; the HU window is applied on the
training device (``mim_scale.data.window.hu_window``), not here. Beside it, in the same run: the same with
the window applied on this CPU too (float32 [0, 1] out, like MONAI's, with the window's own CPU time per
crop), ours before int16 batches (the loaders' old float32 ``crop_window`` + collate, frozen below), and the
real ``make_loader`` with one worker process (the batch crossing to the main process; no pinning without
CUDA). The per-core figures are medians over ``--repeats`` rounds that interleave ours and the warm
PersistentDataset, so both see the same machine load.

Baselines (all in this invocation, same inputs, same k crops per volume read): MONAI's uncached
``LoadImaged + Orientationd + ScaleIntensityRanged + SpatialPadd + RandSpatialCropSamplesd`` over NIfTI,
and MONAI's ``PersistentDataset`` (cold pass, then warm passes with its cache misses counted); also the bytes
on disk each needs. MONAI's figures stop at its list of crops (no collate), ours include the batch. Inputs:
the real CT (``MIM_SCALE_SAMPLE_DATA``) plus ``shards synth`` phantoms at 0.8 x 0.8 x 1.5 mm. The MONAI
pipelines keep the native grid (no Spacingd); our shards are built at ``--spacing`` (1.5 mm), so ours also
did the resampling, once, at build time. Loader cores per GPU: ``--gpu-crops-per-s`` (the issue's 20) over
our per-core rate. One JSON line per k on stdout; the machine must be quiet for the numbers to mean much.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

AIR_HU = -1000


def old_float32_crop(volume: np.ndarray, size: int, offsets: tuple[float, float, float],
                     hu_min: float, hu_max: float) -> torch.Tensor:
    """The loaders' crop before int16 batches (``crop_window``, mim_scale/data/stream.py at 919fbe9), frozen
    for the before figure: padded copy of a small volume, contiguous copy, float32, clamp, shift, scale."""
    pads = [max(0, size - n) for n in volume.shape]
    if any(pads):
        volume = np.pad(volume, [(p // 2, p - p // 2) for p in pads], constant_values=AIR_HU)
    starts = [min(int(u * (n - size + 1)), n - size) for u, n in zip(offsets, volume.shape)]
    patch = volume[starts[0]:starts[0] + size, starts[1]:starts[1] + size, starts[2]:starts[2] + size]
    crop = torch.from_numpy(np.ascontiguousarray(patch)).float()
    crop = (crop.clamp_(hu_min, hu_max) - hu_min) / (hu_max - hu_min)
    return crop.unsqueeze(0)


class Clock:
    """Wall-clock and CPU time (this process: user + sys, page faults included) of what runs under it. On a
    shared machine the CPU figure is the honest "per core" rate (other processes' load does not count); the
    wall-clock one is what a loader worker that owned its core would see, at best."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Clock":
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def _rates(crops: int, clock: Clock) -> dict[str, float]:
    return {"per_cpu_s": crops / clock.cpu, "per_wall_s": crops / clock.wall}


def _drain(batches: Iterator, n: int, per_batch: Callable[[object], object] | None = None) -> tuple[Clock, Clock]:
    """Time ``n`` batches of one crop (the first, with imports and the first open, is left out):
    (the whole loop, the part spent in ``per_batch``)."""
    next(batches)
    whole, inner = Clock(), Clock()
    with whole:
        for _ in range(n):
            batch = next(batches)
            if per_batch is not None:
                with inner:
                    per_batch(batch)
    return whole, inner


def _loader_one_worker(loader, n: int) -> dict[str, float]:
    """``n`` batches of one crop from a DataLoader with one worker process: wall-clock crops/s, and CPU per
    crop of the worker (its whole life, start-up included, over at least ``n + 1`` batches it produced:
    an upper bound) and of the main process (receiving the batches)."""
    import gc
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    batches = iter(loader)
    whole = _drain(batches, n)[0]
    del batches
    gc.collect()  # the iterator's shutdown joins the worker, whose CPU then counts in RUSAGE_CHILDREN
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"crops_per_s_wall": round(n / whole.wall, 2), "worker_cpu_ms_per_crop": round(1000 * worker_s / (n + 1), 2),
            "main_cpu_ms_per_crop": round(1000 * whole.cpu / n, 2)}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _bench_k(args, k: int, work: Path, niftis: list[Path], n_vol: int, size: int, passes: int) -> dict:
    from monai.data import Dataset, PersistentDataset
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, Orientationd, RandSpatialCropSamplesd,
                                  ScaleIntensityRanged, SpatialPadd)

    from mim_scale.config import DataConfig
    from mim_scale.data.stream import CropStream, make_loader, manifest_shards
    from mim_scale.data.window import hu_window

    cfg = DataConfig(shards=str(work / "shards"), crop_size=size, crops_per_volume=k, shuffle_buffer=1,
                     num_workers=0, seed=0)
    shards = manifest_shards(cfg)
    n = passes * n_vol * k  # crops per measurement, the same volumes as MONAI's passes (one shard holds them all)

    def ours() -> dict[str, float]:  # the product path: int16 batches, the window left to the device
        return _rates(n, _drain(CropStream(cfg, shards, batch_size=1).batches(), n)[0])

    def ours_window_on_cpu() -> tuple[dict[str, float], float]:  # ... and the window on this core too
        whole, window = _drain(CropStream(cfg, shards, batch_size=1).batches(), n,
                               lambda b: hu_window(b["crop"], cfg.hu_min, cfg.hu_max))
        return _rates(n, whole), 1000 * window.cpu / n

    def before() -> dict[str, float]:  # the float32 crop on the loader, then the old collate's stack
        crops = (torch.stack([old_float32_crop(v, size, o, cfg.hu_min, cfg.hu_max)])
                 for v, o, _meta in CropStream(cfg, shards, batch_size=1)._crops())
        return _rates(n, _drain(crops, n)[0])

    det = [LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), Orientationd(keys="image", axcodes="RAS"),
           ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
           SpatialPadd(keys="image", spatial_size=(size,) * 3)]
    rand = [RandSpatialCropSamplesd(keys="image", roi_size=(size,) * 3, num_samples=k, random_size=False)]
    items = [{"image": str(p)} for p in niftis]

    def run(ds, n_passes: int = passes) -> dict[str, float]:
        crops, clock = 0, Clock()
        with clock:
            for _ in range(n_passes):
                for i in range(len(ds)):
                    crops += len(ds[i])
        return _rates(crops, clock)

    uncached = run(Dataset(items, Compose(det + rand)))

    misses = {"n": 0}

    class CountingPersistentDataset(PersistentDataset):
        """Counts the deterministic pre-transforms it actually recomputes (cache misses)."""

        def _pre_transform(self, item_transformed):
            misses["n"] += 1
            return super()._pre_transform(item_transformed)

    cache = work / f"persistent_cache_k{k}"
    pds = CountingPersistentDataset(items, Compose(det + rand), cache_dir=cache)
    cold = run(pds, 1)
    cold_misses, misses["n"] = misses["n"], 0

    rounds: dict[str, list[dict[str, float]]] = {"ours_int16": [], "ours_window_on_cpu": [],
                                                 "ours_before_float32": [], "monai_persistent_warm": []}
    window_ms = []
    for _ in range(args.repeats):  # interleaved, so that ours and the warm cache see the same machine load
        rounds["ours_int16"].append(ours())
        rates, ms = ours_window_on_cpu()
        rounds["ours_window_on_cpu"].append(rates)
        window_ms.append(ms)
        rounds["ours_before_float32"].append(before())
        rounds["monai_persistent_warm"].append(run(pds))
    loader = _loader_one_worker(make_loader(dataclasses.replace(cfg, num_workers=1), shards, rank=0, world_size=1,
                                            batch_size=1, pin_memory=False), max(n, 48))

    def median(key: str, unit: str) -> float:
        return statistics.median(r[unit] for r in rounds[key])

    per_core = {key: round(median(key, "per_cpu_s"), 2) for key in rounds}
    per_core.update(monai_uncached=round(uncached["per_cpu_s"], 2), monai_persistent_cold=round(cold["per_cpu_s"], 2))
    wall = {key: round(median(key, "per_wall_s"), 2) for key in rounds}
    wall.update(monai_uncached=round(uncached["per_wall_s"], 2), monai_persistent_cold=round(cold["per_wall_s"], 2),
                ours_loader_1_worker=loader["crops_per_s_wall"])
    ours_rate, warm, on_cpu = per_core["ours_int16"], per_core["monai_persistent_warm"], per_core["ours_window_on_cpu"]
    gpu = args.gpu_crops_per_s
    voxels = size ** 3
    return {
        "bench": "data", "codec": args.codec, "volumes": n_vol, "phantom_shape": list(args.shape), "crop": size,
        "k": k, "passes": passes, "repeats": args.repeats,
        # crops per CPU-second of the process (medians over the rounds): ours_int16 is the product (int16
        # batch, window on the device); ours_window_on_cpu gives float32 [0, 1] like MONAI's; ours_before_float32
        # is the old float32 loader path
        "crops_per_s_per_core": per_core,
        "crops_per_s_wall": wall,
        "rounds_per_cpu_s": {key: [round(r["per_cpu_s"], 2) for r in v] for key, v in rounds.items()},
        "hu_window_cpu_ms_per_crop": round(statistics.median(window_ms), 2),
        "ratio_vs_uncached": round(ours_rate / per_core["monai_uncached"], 2),
        "ratio_vs_persistent_warm": round(ours_rate / warm, 2),
        "ratio_window_on_cpu_vs_persistent_warm": round(on_cpu / warm, 2),
        "ratio_vs_before": round(ours_rate / per_core["ours_before_float32"], 2),
        # the most conservative: our real DataLoader's CPU per crop (worker + main process, shared-memory handoff
        # included) against MONAI's warm cache in-process (which a DataLoader would charge the same handoff, x2 bytes)
        "ratio_through_dataloader_vs_persistent_warm": round(
            1000 / (loader["worker_cpu_ms_per_crop"] + loader["main_cpu_ms_per_crop"]) / warm, 2),
        # the real DataLoader, one worker process: its CPU per crop includes the batch's shared-memory pages
        # (what PyTorch's worker-to-main handoff costs, the same for its default collate)
        "ours_loader_1_worker": loader,
        "loader_cores_per_gpu": {"gpu_crops_per_s": gpu, "ours": round(gpu / ours_rate, 2),
                                 "ours_through_dataloader": round(
                                     gpu * (loader["worker_cpu_ms_per_crop"] + loader["main_cpu_ms_per_crop"]) / 1000, 2),
                                 "ours_whole_cores": math.ceil(gpu / ours_rate),
                                 "ours_window_on_cpu": round(gpu / on_cpu, 2),
                                 "monai_persistent_warm": round(gpu / warm, 2)},
        "persistent_cache_misses": {"cold_pass": cold_misses, "warm_passes": misses["n"]},
        # through the loader's batch, the pinned buffer and the host-to-device copy, per crop
        "bytes_per_crop": {"ours_int16": 2 * voxels, "float32_before_and_monai": 4 * voxels},
        "bytes": {"persistent_cache": _dir_bytes(cache)},
        "torch_threads": torch.get_num_threads(),
    }


def bench_data(args) -> list[dict]:
    from mim_scale.shards.builder import build_shards
    from mim_scale.shards.synth import phantom, write_nifti

    ct = Path(os.environ.get("MIM_SCALE_SAMPLE_DATA", "/work/shared/data/ct"))
    work = Path(tempfile.mkdtemp(prefix="mim-bench-data-", dir=args.workdir))
    try:
        niftis = [ct / "abdomen_pelvis_ct.nii.gz"]
        for i in range(args.phantoms):
            niftis.append(write_nifti(phantom(args.shape, seed=i), work / f"phantom{i}.nii.gz", spacing=(0.8, 0.8, 1.5)))
        source_bytes = sum(p.stat().st_size for p in niftis)
        report = build_shards([str(p) for p in niftis], work / "shards", spacing=args.spacing, workers=0,
                              progress=False, codec=args.codec)
        raw_int16 = 2 * report.voxels
        size, passes, n_vol = args.crop, args.passes, len(niftis)
        records = []
        for k in args.k:
            records.append(_bench_k(args, k, work, niftis, n_vol, size, passes))
            records[-1]["bytes"] = {"nifti_sources": source_bytes, "our_shards": report.shard_bytes,
                                    "raw_int16_at_shard_spacing": raw_int16, **records[-1]["bytes"]}
            records[-1]["shards_vs_raw_int16"] = round(report.shard_bytes / raw_int16, 3)
            print(json.dumps(records[-1]), flush=True)
        return records
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/data_path.py", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: the system temp dir)")
    parser.add_argument("--phantoms", type=int, default=1)
    parser.add_argument("--phantom-shape", default="150,256,256", help="D,H,W of each phantom (issue: 300,512,512)")
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--codec", default="npy.gz", choices=("npy.gz", "npy"), help="shard codec")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--k", default="1,2", help="crops per volume read, both sides; a comma list is one "
                        "record each (the recipe reads 1)")
    parser.add_argument("--passes", type=int, default=4, help="passes over the volumes per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of ours and the warm cache")
    parser.add_argument("--gpu-crops-per-s", type=float, default=20.0, help="what one GPU consumes (issue 17: 20)")
    args = parser.parse_args(argv)
    args.k = [int(x) for x in str(args.k).split(",")]
    args.shape = tuple(int(x) for x in args.phantom_shape.split(","))
    torch.set_num_threads(1)
    bench_data(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
