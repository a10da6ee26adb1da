"""MiM against plain MAE at equal training FLOPs, scored on a fixed validation set (both trained in this run).

    OMP_NUM_THREADS=2 python benchmarks/mim_vs_mae.py --config tiny \\
        --ct /work/shared/data/ct/abdomen_pelvis_ct.nii.gz --mim-steps 50 --out compare.json   # CPU, a few minutes
    python benchmarks/mim_vs_mae.py --config tiny --ct CT.nii.gz --mim-steps 200 --valset val.safetensors

Both models share the backbone and the config; the MAE baseline is ``masking.levels = 1``: one
view, the downsampled crop (V^3), random masking at the level-1 ratio, no alignment. The MiM run
gets ``--mim-steps`` steps; the MAE run gets as many steps as the same number of training FLOPs
buys (:func:`flops_per_sample`), on the same crop stream. Both are scored on the validation set's
MAE-task masks (the saved random masks of the level-1 views: :func:`mae_task_loss`), the MiM
model also on its own per-level validation losses. The baseline (the MAE arm) is trained in the same
invocation; ``mim_minus_mae`` is the difference of the two validation losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mim_scale.config import Config, load_config
from mim_scale.errors import UserFacingError
from mim_scale.model.flops import flops_per_sample
from mim_scale.model.mim import build_model
from mim_scale.model.plain_train import crop_stream, train
from mim_scale.model.validation import (ValidationSet, build_validation_set, load_ct_hu, mae_task_loss,
                                        validation_losses)


def compare_mim_mae(cfg: Config, volumes_hu: list[np.ndarray], *, mim_steps: int, batch: int = 2,
                    val_crops: int = 4, seed: int = 0, lr: float | None = None,
                    vset: ValidationSet | None = None, log: Callable[[str], None] = print) -> dict:
    """Train MiM (cfg) and plain MAE (cfg with one level) for equal FLOPs; score both."""
    if cfg.masking.levels == 1:
        raise UserFacingError("compare: the config is already plain MAE (masking.levels = 1); give a MiM config")
    mae_cfg = cfg.replace({"masking.levels": 1})
    f_mim, f_mae = flops_per_sample(cfg), flops_per_sample(mae_cfg)
    budget = mim_steps * batch * f_mim
    mae_steps = max(1, int(round(budget / (batch * f_mae))))
    lr = lr if lr is not None else (cfg.train.lr or cfg.train.base_lr * batch / 256)
    vset = vset or build_validation_set(volumes_hu, cfg, val_crops, seed=seed + 1)
    log(f"compare: MiM {mim_steps} steps x {batch} crops at {f_mim / 1e9:.2f} GFLOP/crop; "
        f"MAE {mae_steps} steps at {f_mae / 1e9:.2f} GFLOP/crop; budget {budget / 1e12:.3f} TFLOP; lr {lr:g}")
    report: dict = {"config": cfg.name, "batch": batch, "lr": lr, "budget_flops": budget, "val_crops": len(vset),
                    "seed": seed}
    for name, run_cfg, steps in (("mim", cfg, mim_steps), ("mae", mae_cfg, mae_steps)):
        torch.manual_seed(seed)  # same backbone init for both
        model = build_model(run_cfg)
        before = mae_task_loss(model, vset)
        t0 = time.perf_counter()
        history = train(model, crop_stream(volumes_hu, run_cfg, batch, seed), steps, lr=lr,
                        weight_decay=run_cfg.train.weight_decay, betas=tuple(run_cfg.train.betas),
                        warmup=run_cfg.train.warmup_steps, grad_clip=run_cfg.train.grad_clip, seed=seed)
        seconds = time.perf_counter() - t0
        entry = {"steps": steps, "flops": steps * batch * flops_per_sample(run_cfg), "train_seconds": seconds,
                 "mae_task_val_loss_before": before, "mae_task_val_loss": mae_task_loss(model, vset),
                 "final_train_total": history[-1]["total"]}
        if name == "mim":
            entry.update(validation_losses(model, vset))
        report[name] = entry
        log(f"compare: {name}: {steps} steps in {seconds:.1f} s, MAE-task validation loss "
            f"{entry['mae_task_val_loss_before']:.4f} -> {entry['mae_task_val_loss']:.4f}")
    report["mim_minus_mae"] = report["mim"]["mae_task_val_loss"] - report["mae"]["mae_task_val_loss"]
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/mim_vs_mae.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", help="shipped config name or file (a MiM config)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--ct", action="append", required=True, help="NIfTI CT volume in HU (repeatable)")
    ap.add_argument("--mim-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--val-crops", type=int, default=4)
    ap.add_argument("--valset", help="a saved validation set (.safetensors) to use instead of drawing one")
    ap.add_argument("--save-valset", help="write the drawn validation set here")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        volumes = [load_ct_hu(p) for p in args.ct]
        vset = ValidationSet.load(args.valset, cfg) if args.valset else build_validation_set(
            volumes, cfg, args.val_crops, seed=args.seed + 1)
        if args.save_valset:
            vset.save(args.save_valset)
        report = compare_mim_mae(cfg, volumes, mim_steps=args.mim_steps, batch=args.batch, seed=args.seed,
                                 lr=args.lr, vset=vset)
    except UserFacingError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
