"""Shard build: throughput, peak worker memory, and shard bytes per voxel per codec.

    OMP_NUM_THREADS=1 python benchmarks/shard_build.py                          # the sample CT, in-process, 1 core
    OMP_NUM_THREADS=1 python benchmarks/shard_build.py /data/ct --workers 4      # your inputs, 4 Ray workers

Figures printed, each against its baseline measured in the same run:
* volumes per minute per core of a full build (discovery, decode, resample, encode, write);
* peak resident memory of a build worker (the driver itself when ``workers=0``);
* shard bytes per voxel for each codec against raw int16 (2 bytes/voxel), with encode/decode speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mim_scale.shards.builder import build_shards
from mim_scale.shards.format import decode_sample, decode_volume, encode_volume, read_manifest
from mim_scale.shards.verify import iter_shard_samples


def _default_inputs() -> list[str]:
    from mim_scale.sample_data import ensure_sample_data

    ct = ensure_sample_data(cache_dir=Path(os.environ.get("MIM_SCALE_CACHE", Path.home() / ".cache" / "mim-scale")))
    return [f"dicom={ct / 'abdomen_dicom'}", f"nifti={ct / 'abdomen_pelvis_ct.nii.gz'}"]


def codec_table(volumes: list[np.ndarray]) -> list[tuple[str, float, float, float]]:
    """-> [(codec, bytes per voxel, encode MB/s, decode MB/s)] over ``volumes`` (raw int16 MB/s)."""
    rows = []
    raw = sum(v.nbytes for v in volumes)
    voxels = sum(v.size for v in volumes)
    for codec, level in (("npy", 0), ("npy.gz", 1), ("npy.gz", 6)):
        t0 = time.perf_counter()
        blobs = [encode_volume(v, codec, level) for v in volumes]
        t1 = time.perf_counter()
        for b in blobs:
            decode_volume(b, codec)
        t2 = time.perf_counter()
        name = codec if codec == "npy" else f"{codec} level {level}"
        rows.append((name, sum(len(b) for b in blobs) / voxels, raw / 1e6 / (t1 - t0), raw / 1e6 / (t2 - t1)))
    return rows


def run_bench(inputs: list[str] | None = None, repeat: int = 3, workers: int = 0, work_dir: Path | None = None) -> str:
    """Build ``inputs`` ``repeat`` times (fresh output each time) and return the printed report."""
    inputs = list(inputs or _default_inputs())
    tmp = Path(tempfile.mkdtemp(prefix="shards-bench-", dir=work_dir))
    lines = []
    started_ray = False
    if workers:
        import ray

        if not ray.is_initialized():
            # start the cluster once, outside the timed builds (its start-up is not build throughput)
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            started_ray = True
    try:
        times, built, rss = [], 0, 0
        rep = None
        for r in range(max(repeat, 1)):
            out = tmp / f"out{r}"
            rep = build_shards(inputs, out, workers=workers, progress=False, private_dir=tmp / f"private{r}")
            times.append(rep.seconds)
            built = rep.built_now
            rss = max(rss, rep.peak_worker_rss_bytes)
        assert rep is not None
        cores = workers if workers else 1
        med = float(np.median(times))
        vpm = 60.0 * built / med / cores if med > 0 else 0.0
        lines.append(f"build: {built} volume(s), median {med:.2f} s over {len(times)} run(s), {cores} core(s)"
                     f" -> {vpm:.1f} volumes/min/core")
        lines.append(f"peak worker memory: {rss / 2**20:.0f} MiB")
        lines.append(f"shards: {rep.shard_bytes} bytes for {rep.voxels} voxels = {rep.bytes_per_voxel:.3f} bytes/voxel"
                     f" (raw int16 2.000; ratio {rep.bytes_per_voxel / 2:.3f})")
        m = read_manifest(rep.out)
        vols = [decode_sample(s)[0] for sh in m["shards"] for s in iter_shard_samples(rep.out / sh["url"])]
        lines.append("codec                  bytes/voxel  vs raw  encode MB/s  decode MB/s")
        for name, bpv, enc, dec in codec_table(vols):
            lines.append(f"{name:<22} {bpv:>11.3f}  {bpv / 2:>6.3f}  {enc:>11.0f}  {dec:>11.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if started_ray:
            import ray

            ray.shutdown()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/shard_build.py", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs (default: the sample CT)")
    p.add_argument("--repeat", type=int, default=3, help="build the inputs this many times as copies")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=None)
    args = p.parse_args(argv)
    print(run_bench(args.inputs, repeat=args.repeat, workers=args.workers, work_dir=args.work_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
