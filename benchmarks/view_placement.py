"""View placement: build the MiM level views in the DataLoader workers or on the training device? Measured.

    OMP_NUM_THREADS=2 python benchmarks/view_placement.py --config tiny --batch 2          # CPU, seconds
    python benchmarks/view_placement.py --config base --batch 1 --steps 1                  # CPU, ~1 min

Building views in the loader would move this work off the device but multiply what crosses the
host-to-device link: one crop of (2V)^3 voxels becomes 1 + 4 + 16 views of V^3 (21 / 8 = 2.6x the bytes).
This prints the view-building time against the whole training step measured in the same run (its
baseline) and the bytes each placement moves. CPU only: the model and the crops are built on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mim_scale.config import load_config
from mim_scale.model import build_model
from mim_scale.model.views import make_views


def measure(config: str, batch: int, steps: int) -> dict:
    cfg = load_config(config)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side = cfg.data.crop_size
    crops = torch.rand(batch, cfg.model.in_channels, side, side, side)
    gen = torch.Generator()
    view_s, step_s = [], []
    for i in range(steps + 1):
        gen.manual_seed(i)
        t = time.perf_counter()
        views = make_views(crops, cfg.model, cfg.masking, generator=gen)
        view_s.append(time.perf_counter() - t)
        gen.manual_seed(i)
        t = time.perf_counter()
        out = model(crops, generator=gen)
        out["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t)
    n_views = sum(v.x.shape[0] for v in views)
    view_bytes = sum(v.x.numel() for v in views) * 4
    crop_bytes = crops.numel() * 4
    vs, ss = min(view_s[1:]), min(step_s[1:])
    return {"config": config, "batch": batch, "views": n_views, "view_build_s": vs, "step_s": ss,
            "view_share_of_step": vs / ss, "bytes_to_device_crops": crop_bytes, "bytes_to_device_views": view_bytes,
            "bytes_ratio_views_vs_crops": view_bytes / crop_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    r = measure(args.config, args.batch, args.steps)
    print(json.dumps(r, indent=1))
    print(f"views take {100 * r['view_share_of_step']:.1f}% of a {args.config} step on this device; building them in "
          f"the loader would send {r['bytes_ratio_views_vs_crops']:.2f}x the bytes to the device")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
