"""Shard memory: peak resident memory of the shard builder on inputs just under the memory caps and on the bomb
corpus, each against the baseline of the same process before it builds.

    OMP_NUM_THREADS=1 python benchmarks/shard_memory.py                  # CPU, Linux, the sample CT, ~2 min
    OMP_NUM_THREADS=1 python benchmarks/shard_memory.py --copies 10 --work-dir /tmp

Each case runs in a fresh process that imports the builder and its readers, notes its resident memory (the
baseline: an idle worker), resets its peak (Linux ``clear_refs``, so import transients do not count), builds the
input in-process (``workers=0``: the driver is the worker) and notes its peak RSS (VmHWM). Printed per case:
outcome, baseline, peak, peak - baseline (the working memory), the volume budget of the cap it ran under and
working / budget (must stay <= 1 for inputs that build; near 0 for bombs, which are refused before they allocate).

Cases: the real DICOM series (``ensure_sample_data``) with the worker memory set just above what the caps
say it needs; the real series stacked 10 times along z (a 512x512x200 int16 NIfTI made from it) likewise;
every bomb of ``bombs.BOMBS`` at the default worker memory (4 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _child(args: dict) -> dict:
    """Build one input in this process; -> outcome and peak RSS before and after."""
    import numpy  # noqa: F401 - imported before the baseline, as in a worker
    import pydicom  # noqa: F401
    import scipy.ndimage  # noqa: F401

    from mim_scale.shards.builder import BuildConfig, build_shards

    try:  # the JPEG 2000 decoder of the sample series, loaded before the baseline too
        import openjpeg  # noqa: F401
    except ImportError:
        pass
    # the baseline is the resident memory of the idle worker; the import transients are not part of the peak
    baseline = _status_bytes("VmRSS") if _reset_peak() else None
    baseline = baseline if baseline is not None else _peak_rss_bytes()
    cfg = BuildConfig(worker_memory_bytes=args["worker_memory_bytes"])
    t0 = time.perf_counter()
    rep = build_shards([args["input"]], Path(args["out"]), config=cfg, workers=0, progress=False)
    outcome = "built" if rep.num_samples else ",".join(sorted(rep.rejected)) or "nothing"
    return {"outcome": outcome, "baseline": baseline, "peak": _peak_rss_bytes(), "seconds": time.perf_counter() - t0}


def _run_case(input_path: str, worker_memory_bytes: int, work: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    arg = json.dumps({"input": input_path, "out": str(out / "shards"), "worker_memory_bytes": worker_memory_bytes})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", arg],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"outcome": f"FAILED rc={proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}", "baseline": 0,
                "peak": 0, "seconds": 0.0}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _need_bytes(shape_dhw: tuple[int, int, int], itemsize: int, spacing_xyz: tuple[float, float, float],
                target_mm: float) -> int:
    """What the caps say building this volume needs (limits' model)."""
    from mim_scale.shards.geometry import resampled_shape
    from mim_scale.shards.limits import MemoryLimits

    lim = MemoryLimits()
    out = resampled_shape(shape_dhw, spacing_xyz, target_mm)
    return max(lim.source_bytes(shape_dhw, itemsize), lim.resample_bytes(shape_dhw, out))


def _stacked_series_nifti(series_dir: Path, dst: Path, copies: int) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    """The real series stacked ``copies`` times along z, as an int16 NIfTI -> ((D, H, W), (sx, sy, sz))."""
    import nibabel as nib
    import numpy as np

    from mim_scale.shards.dicom import list_files, load_series
    from mim_scale.shards.geometry import canonicalize

    vol = canonicalize(load_series(list_files(series_dir)))
    arr = np.clip(np.rint(vol.array), -1024, 3071).astype(np.int16)
    big = np.concatenate([arr] * copies, axis=0)  # (D, H, W) LPS
    sx, sy, sz = vol.spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(big.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(dst))
    return big.shape, (sx, sy, sz)


def run(work_dir: Path | None = None, copies: int = 10, margin: float = 1.02) -> str:
    """All cases -> the printed table."""
    from mim_scale.sample_data import ensure_sample_data
    from mim_scale.shards.bombs import BOMBS, make_bomb_corpus
    from mim_scale.shards.limits import DEFAULT_WORKER_MEMORY_BYTES, RESERVED_BYTES, MemoryLimits

    ct = ensure_sample_data(cache_dir=Path(os.environ.get("MIM_SCALE_CACHE", Path.home() / ".cache" / "mim-scale")))
    work = Path(tempfile.mkdtemp(prefix="membench-", dir=work_dir))
    series = ct / "abdomen_dicom"
    import pydicom

    ds = pydicom.dcmread(sorted(series.iterdir())[0], stop_before_pixels=True)
    nfiles = len(list(series.iterdir()))
    ps = [float(v) for v in ds.PixelSpacing]
    cases: list[tuple[str, str, int]] = []
    need = _need_bytes((nfiles, int(ds.Rows), int(ds.Columns)), 2, (ps[1], ps[0], 2.0), 1.5)
    cases.append(("real DICOM series 512x512x20, just under its cap", str(series), RESERVED_BYTES + int(need * margin)))
    stacked = work / "stacked.nii"
    shape, spacing = _stacked_series_nifti(series, stacked, copies)
    need = _need_bytes(shape, 2, spacing, 1.5)
    cases.append((f"real series x{copies} ({shape[2]}x{shape[1]}x{shape[0]} int16 NIfTI), just under its cap",
                  str(stacked), RESERVED_BYTES + int(need * margin)))
    bombs = make_bomb_corpus(work / "bombs")
    for name, path in bombs.items():
        cases.append((f"bomb {name}: {BOMBS[name][1]}", str(path), DEFAULT_WORKER_MEMORY_BYTES))

    mib = 1 << 20
    lines = [f"{'case':<84} {'outcome':<14} {'base':>5} {'peak':>5} {'cap':>5} {'peak/cap':>8} {'work':>5} "
             f"{'budget':>6} {'work/budget':>11}   (MiB; cap = worker memory, budget = cap - reserved)"]
    worst_bomb, baselines = 0, []
    for label, path, wm in cases:
        r = _run_case(path, wm, work)
        budget = MemoryLimits(wm).budget_bytes
        working = r["peak"] - r["baseline"]
        baselines.append(r["baseline"])
        if label.startswith("bomb"):
            worst_bomb = max(worst_bomb, r["peak"])
        lines.append(f"{label[:84]:<84} {r['outcome'][:14]:<14} {r['baseline'] / mib:>5.0f} {r['peak'] / mib:>5.0f} "
                     f"{wm / mib:>5.0f} {r['peak'] / wm:>8.3f} {working / mib:>5.0f} {budget / mib:>6.0f} "
                     f"{working / budget:>11.3f}")
    lines.append(f"bomb corpus: peak RSS {worst_bomb / mib:.0f} MiB = {worst_bomb / max(baselines):.2f}x the idle worker "
                 f"({max(baselines) / mib:.0f} MiB), {worst_bomb / DEFAULT_WORKER_MEMORY_BYTES:.3f} of the "
                 f"{DEFAULT_WORKER_MEMORY_BYTES / mib:.0f} MiB cap (a naive read of the largest bomb needs ~30 GiB)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/shard_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--copies", type=int, default=10, help="times the real series is stacked for the large case")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    print(run(args.work_dir, args.copies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
