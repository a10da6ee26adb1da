"""Shard formats: build throughput per input format (volumes/min/core), each beside NIfTI's measured in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shard_formats.py --ct /work/shared/data/ct          # CPU, ~1-2 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shard_formats.py --ct /work/shared/data/ct --copies 6   # the README's

The real DICOM series of the sample CT (512 x 512 x 20, int16 HU, read by SimpleITK) is written
``--copies`` times in each format, each copy with a small block of its corner changed so that no copy is a
duplicate of another; every format is then built on its own, in-process on one core (``workers=0``), at the
default 1.5 mm, ``--repeat`` times. Printed per format: file MiB per volume, read seconds per volume
(reader + canonical orientation only), full-build volumes/min/core by wall clock and per CPU-minute of
this process (medians of the repeats), each with its ratio to NIfTI (.nii.gz, the baseline). Also the DICOM
original itself, read alone.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from mim_scale.shards.builder import build_shards
from mim_scale.shards.dicom import list_files
from mim_scale.shards.worker import WorkerSettings, WorkItem, load_volume

FORMATS = {  # label -> (file name, compress)
    "nifti .nii.gz": ("v.nii.gz", True),
    "metaimage .mha": ("v.mha", False),
    "metaimage .mhd+.raw": ("v.mhd", False),
    "metaimage .mhd+.zraw": ("v.mhd", True),
    "nrrd .nrrd (gzip)": ("v.nrrd", True),
    "nrrd .nhdr+.raw": ("v.nhdr", False),
}


def _write(img: sitk.Image, folder: Path, copies: int, name: str, compress: bool) -> list[Path]:
    arr = sitk.GetArrayFromImage(img)
    out = []
    for i in range(copies):
        a = arr.copy()
        a[:4, :8, 8 * i:8 * i + 8] = 1000  # a small block differs: no copy is a duplicate of another after resampling
        c = sitk.GetImageFromArray(a)
        c.CopyInformation(img)
        path = folder / f"copy{i}" / name
        path.parent.mkdir(parents=True)
        sitk.WriteImage(c, str(path), useCompression=compress)
        out.append(path)
    return out


def _kind(path: Path) -> str:
    name = path.name.lower()
    return "nifti" if ".nii" in name else "nrrd" if ".nrrd" in name or ".nhdr" in name else "metaimage"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=Path, default=Path("../shared/data/ct"), help="folder with abdomen_dicom/")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    series = args.ct / "abdomen_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    img = reader.Execute()
    tmp = Path(tempfile.mkdtemp(prefix="bench-formats-", dir=args.work_dir))
    settings = WorkerSettings()
    rows = []
    try:
        files = list_files(series)
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            load_volume(WorkItem(0, "k" * 32, "d", "dicom", tuple(files), str(series)), settings)
        dicom_read = (time.perf_counter() - t0) / args.repeat
        for label, (name, compress) in FORMATS.items():
            folder = tmp / label.replace(" ", "_").replace("+", "_")
            paths = _write(img, folder, args.copies, name, compress)
            mib = sum(f.stat().st_size for p in paths for f in p.parent.iterdir()) / len(paths) / 2**20
            t0 = time.perf_counter()
            for p in paths:
                load_volume(WorkItem(0, "k" * 32, "d", _kind(p), (str(p),), str(p)), settings)
            read_s = (time.perf_counter() - t0) / len(paths)
            vpm, vpm_cpu = [], []
            for r in range(args.repeat):
                c0 = time.process_time()
                rep = build_shards([f"bench={folder}"], tmp / f"out{r}", workers=0, progress=False,
                                   private_dir=tmp / f"private{r}")
                assert rep.built_now == args.copies, (label, rep.rejected)
                vpm.append(60.0 * rep.built_now / rep.seconds)
                vpm_cpu.append(60.0 * rep.built_now / (time.process_time() - c0))
                shutil.rmtree(tmp / f"out{r}")
                shutil.rmtree(tmp / f"private{r}")
            rows.append((label, mib, read_s, statistics.median(vpm), statistics.median(vpm_cpu)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base_read, base_vpm, base_cpu = rows[0][2], rows[0][3], rows[0][4]
    print(f"real CT 512x512x20 int16 -> 1.5 mm (333x333x26); {args.copies} volumes per format, median of {args.repeat} builds, 1 core")
    print("vol/min/core: wall clock; vol/CPU-min: this process's CPU time (steadier on a shared machine)")
    print(f"{'format':<22} {'MiB/vol':>8} {'read s/vol':>11} {'vs nifti':>9} {'vol/min/core':>13} {'vs nifti':>9}"
          f" {'vol/CPU-min':>12} {'vs nifti':>9}")
    for label, mib, read_s, vpm, cpu in rows:
        print(f"{label:<22} {mib:>8.1f} {read_s:>11.3f} {read_s / base_read:>8.2f}x {vpm:>13.1f} {vpm / base_vpm:>8.2f}x"
              f" {cpu:>12.1f} {cpu / base_cpu:>8.2f}x")
    print(f"{'dicom (20 files, J2K)':<22} {'':>8} {dicom_read:>11.3f} {dicom_read / base_read:>8.2f}x")


if __name__ == "__main__":
    main()
