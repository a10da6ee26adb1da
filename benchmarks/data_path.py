"""Data path: crops/s on one core of our shard stream against MONAI's pipelines, measured side by side.

    MIM_SCALE_SAMPLE_DATA=/work/shared/data/ct OMP_NUM_THREADS=1 python benchmarks/data_path.py     # CPU, ~2 min
    python benchmarks/data_path.py --phantoms 2 --phantom-shape 300,512,512 --crop 96 --k 2             # the issue's size

Baselines (all in this invocation, same inputs, same k crops per volume read): MONAI's uncached
``LoadImaged + Orientationd + ScaleIntensityRanged + SpatialPadd + RandSpatialCropSamplesd`` over NIfTI,
and MONAI's ``PersistentDataset`` (cold pass, then warm pass with its cache misses counted); also the bytes
on disk each needs. Inputs: the real CT (``MIM_SCALE_SAMPLE_DATA``) plus ``shards synth`` phantoms at
0.8 x 0.8 x 1.5 mm. The MONAI pipelines keep the native grid (no Spacingd); our shards are built at
``--spacing`` (1.5 mm), so ours also did the resampling, once, at build time. One JSON line on stdout;
the machine must be quiet for the numbers to mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


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
        print(json.dumps(record), flush=True)
        return record
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
    parser.add_argument("--k", type=int, default=2, help="crops per volume read, both sides")
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bench_data(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
