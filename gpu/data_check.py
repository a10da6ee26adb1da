"""The data path on a GPU host: the HU window on the device is exact, what the int16 batch saves in the
host-to-device copy, and loader workers per GPU with pinned memory (issue 17 item 9).

1. ``parity``: :func:`mim_scale.data.window.hu_window` on the device against the loaders' old float32 window
   on the CPU, for every int16 value and for crops of the real CT (``--ct``; a phantom when absent), at the
   recipe's window and a fine-tuning one: bit-identical or the script fails.
2. ``transfer``: a pinned (B, 1, S, S, S) batch to the device, ``non_blocking``, per crop: int16 + the window
   on the device (now) against float32 (before); best of ``--reps``.
3. ``loader``: ``make_loader`` (pin_memory) over an ``npy`` shard of phantoms at the recipe's size
   (300 x 273 x 273 voxels, about a 512 x 512 x 300 scan at 1.5 mm), each batch moved and windowed on the
   device, with 1, 2 and 4 worker processes: crops/s, and the workers one GPU needs at
   ``--gpu-crops-per-s``.

    python gpu/data_check.py --ct CT.nii.gz --json data.json       # on the GPU machine (gpu/run_all.sh)
    python gpu/data_check.py --device cpu --small                  # smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from depthwise_check import best_ms  # a sibling script: gpu/ is sys.path[0] when run as python gpu/<name>.py

WINDOWS = ((-1000.0, 1000.0), (-175.0, 250.0))  # the recipe's, BTCV fine-tuning's


def old_window(hu: torch.Tensor, hu_min: float, hu_max: float) -> torch.Tensor:
    """The loaders' float32 window before int16 batches (stream.py at 919fbe9), on the CPU."""
    return (hu.float().clamp_(hu_min, hu_max) - hu_min) / (hu_max - hu_min)


def ct_volume(path: str | None, small: bool) -> tuple[np.ndarray, str]:
    """(D, H, W) int16 HU of the real CT (as the sample-data tests read it), or a phantom."""
    if path and Path(path).is_file():
        try:
            import nibabel as nib
        except ImportError:  # not carried: say so and go on with the phantom
            return ct_volume(None, small)[0], "phantom (nibabel missing, --ct not read)"
        vol = np.clip(np.asarray(nib.load(path).dataobj), -1024, 3071).astype(np.int16).transpose(2, 1, 0).copy()
        return vol, f"real CT {Path(path).name}"
    from mim_scale.shards.synth import phantom

    return phantom((24, 40, 40) if small else (112, 128, 128), seed=0), "phantom (no --ct)"


def parity(device: torch.device, volume: np.ndarray, crop: int) -> dict:
    from mim_scale.data.stream import crop_hu
    from mim_scale.data.window import hu_window

    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).reshape(1, 1, 16, 64, 64)
    rng = np.random.default_rng(0)
    crops = torch.stack([crop_hu(volume, crop, tuple(rng.random(3))) for _ in range(4)])
    out = {}
    for hu_min, hu_max in WINDOWS:
        for name, hu in (("every_int16", every), ("ct_crops", crops)):
            got = hu_window(hu.to(device), hu_min, hu_max).cpu()
            out[f"{name} [{hu_min:g}, {hu_max:g}]"] = bool(torch.equal(got, old_window(hu, hu_min, hu_max)))
    return out


def transfer(device: torch.device, batch: int, crop: int, reps: int) -> dict:
    from mim_scale.data.window import hu_window

    pin = device.type == "cuda"
    shape = (batch, 1, crop, crop, crop)
    hu = torch.randint(-1024, 3072, shape, dtype=torch.int16)
    hu = hu.pin_memory() if pin else hu
    as_float = old_window(hu, -1000.0, 1000.0)
    as_float = as_float.pin_memory() if pin else as_float
    int16_copy = best_ms(lambda: hu.to(device, non_blocking=True), device, reps)
    int16_and_window = best_ms(lambda: hu_window(hu.to(device, non_blocking=True), -1000.0, 1000.0), device, reps)
    float32_copy = best_ms(lambda: as_float.to(device, non_blocking=True), device, reps)
    return {"batch": batch, "crop": crop, "pinned": pin,
            "ms_per_crop": {"int16_copy": round(int16_copy / batch, 3),
                            "int16_copy_and_window": round(int16_and_window / batch, 3),
                            "window_alone": round((int16_and_window - int16_copy) / batch, 3),
                            "float32_copy_before": round(float32_copy / batch, 3)},
            "copy_gb_per_s": {"int16": round(hu.numel() * 2 / int16_copy / 1e6, 1),
                              "float32": round(as_float.numel() * 4 / float32_copy / 1e6, 1)},
            "speedup_vs_float32_copy": round(float32_copy / int16_and_window, 2)}


def write_phantom_shard(folder: Path, shape: tuple[int, int, int], volumes: int) -> Path:
    """An ``npy`` shard of phantom volumes in the builder's sample format, and its manifest."""
    import io

    from mim_scale.shards.format import encode_volume
    from mim_scale.shards.synth import phantom

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for i in range(volumes):
            key = f"p{i:04d}"
            vol = phantom(shape, seed=i)
            for ext, data in (("npy", encode_volume(vol, "npy")),
                              ("json", json.dumps({"key": key, "dataset": "phantom", "shape": list(shape)}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"url": "shard-000000.tar", "samples": volumes}]}))
    return folder


def loader(device: torch.device, shards: Path, crop: int, workers: list[int], seconds: float, gpu_rate: float) -> dict:
    from mim_scale.config import DataConfig
    from mim_scale.data.stream import load_shard_list, make_loader
    from mim_scale.data.window import hu_window

    out: dict = {"crop": crop, "k": 1, "micro_batch": 1, "by_workers": {}}
    for w in workers:
        cfg = DataConfig(shards=str(shards), crop_size=crop, crops_per_volume=1, shuffle_buffer=1, num_workers=w)
        it = iter(make_loader(cfg, load_shard_list(str(shards)), rank=0, world_size=1, batch_size=1,
                              pin_memory=device.type == "cuda"))
        for _ in range(2 * w + 1):  # workers started, first batches out
            next(it)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            x = hu_window(next(it)["crop"].to(device, non_blocking=True), cfg.hu_min, cfg.hu_max)
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
        del it
        out["by_workers"][str(w)] = {"crops_per_s": round(rate, 2), "per_worker": round(rate / w, 2)}
    best = max(v["per_worker"] for v in out["by_workers"].values())
    out["workers_per_gpu_at"] = {"gpu_crops_per_s": gpu_rate, "workers": math.ceil(gpu_rate / best)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ct", default=None, help="the real CT (abdomen_pelvis_ct.nii.gz); a phantom without it")
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=4.0, help="loader timing per worker count")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--gpu-crops-per-s", type=float, default=20.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    crop = 32 if args.small else 192
    volume, source = ct_volume(args.ct, args.small)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "ct": source}
    result["parity"] = parity(device, volume, min(crop, 96))
    print(json.dumps({"parity": result["parity"]}), flush=True)
    result["transfer"] = transfer(device, 1 if args.small else 4, crop, 2 if args.small else args.reps)
    print(json.dumps({"transfer": result["transfer"]}), flush=True)
    with tempfile.TemporaryDirectory(prefix="mim-data-check-") as tmp:
        shape = (24, 40, 40) if args.small else (300, 273, 273)
        shards = write_phantom_shard(Path(tmp) / "shards", shape, volumes=2)
        result["loader"] = loader(device, shards, crop, [int(w) for w in args.workers.split(",")],
                                  0.5 if args.small else args.seconds, args.gpu_crops_per_s)
    print(json.dumps({"loader": result["loader"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    exact = all(result["parity"].values())
    print(f"parity: {'bit-identical' if exact else 'MISMATCH'} ({source})", flush=True)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
