"""Learning ceiling: how much of the masked tokens' target a direct fit on their visible neighbours explains.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learning_ceiling.py \\
        --ct /work/shared/data/ct/abdomen_pelvis_ct.nii.gz                     # CPU, tiny config, ~2 min

Per MiM level, for every masked token: the 6 face neighbours' coarse content (mean and the 3 first moments of their
voxels, standardised by the visible neighbours' means; zeros and a flag where a neighbour is masked or
outside the view), plus the products of the neighbours' means. A ridge regression from those to the
per-patch normalised 8^3 target is fitted on training crops and scored on the learning test's validation
set (tests/model/test_learning.py: 4 crops, seed 1), beside the loss of predicting zeros. It says what a
purpose-built local predictor reaches with as many crops as the test's 200 steps see, which puts the
issue's 200-step bar (each level below 0.7x its step-0 loss) in proportion. The baseline (zeros) is scored
on the same validation set in the same run.
"""

from __future__ import annotations

import argparse

import torch

from mim_scale.config import load_config
from mim_scale.model.plain_train import crop_stream
from mim_scale.model.validation import build_validation_set, load_ct_hu
from mim_scale.model.views import LevelViews, make_views
from mim_scale.ops.reference import norm_pix_target, patchify

FACES = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))


def neighbour_features(lv: LevelViews, patch: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (M, 30), targets (M, patch^3)) for the M masked tokens of a level's views."""
    lin = torch.linspace(-1, 1, patch)
    axes = torch.meshgrid(lin, lin, lin, indexing="ij")
    basis = torch.stack([torch.ones_like(axes[0]), *axes]).reshape(4, -1) / patch**3  # mean, 3 moments
    moments = (patchify(lv.x.float(), patch) @ basis.T).reshape(-1, grid, grid, grid, 4)
    target = norm_pix_target(lv.x.float(), patch, 1e-6)
    visible = (1 - lv.mask).reshape(-1, grid, grid, grid) > 0
    feats, targets = [], []
    for n, d, h, w in (1 - visible.int()).nonzero().tolist():
        parts, means = [], []
        for od, oh, ow in FACES:
            a, b, c = d + od, h + oh, w + ow
            ok = 0 <= a < grid and 0 <= b < grid and 0 <= c < grid and bool(visible[n, a, b, c])
            parts.append(moments[n, a, b, c] if ok else torch.zeros(4))
            parts.append(torch.tensor([float(ok)]))
            if ok:
                means.append(moments[n, a, b, c, 0])
        f = torch.cat(parts)
        if means:  # scale-free, like the per-patch normalised target
            m = torch.stack(means)
            mu, sd = m.mean(), m.std(unbiased=False) + 1e-3
            for k in range(len(FACES)):
                if f[5 * k + 4] > 0:
                    f[5 * k] = (f[5 * k] - mu) / sd
                    f[5 * k + 1:5 * k + 4] /= sd
        feats.append(f)
        targets.append(target[n, (d * grid + h) * grid + w])
    return torch.stack(feats), torch.stack(targets)


def design(f: torch.Tensor) -> torch.Tensor:
    means = f[:, 0::5]
    pairs = torch.einsum("ni,nj->nij", means, means).reshape(len(f), -1)
    return torch.cat([f, pairs, torch.ones(len(f), 1)], dim=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct", required=True, help="NIfTI CT volume in HU")
    ap.add_argument("--train-crops", type=int, default=320, help="crops to fit on (the test's 200 steps see 400)")
    args = ap.parse_args(argv)
    vol = load_ct_hu(args.ct)
    cfg = load_config("tiny")
    patch, grid = cfg.model.patch_size, cfg.model.grid
    stream = crop_stream([vol], cfg, 8, seed=123)
    gen = torch.Generator().manual_seed(5)
    train: dict[int, list] = {}
    for _ in range(max(1, args.train_crops // 8)):
        for lv in make_views(next(stream), cfg.model, cfg.masking, gen):
            train.setdefault(lv.level, []).append(neighbour_features(lv, patch, grid))
    vset = build_validation_set([vol], cfg, 4, seed=1)
    for lv in make_views(vset.crops, cfg.model, cfg.masking, draw=vset.draw):
        x = design(torch.cat([f for f, _ in train[lv.level]]))
        y = torch.cat([t for _, t in train[lv.level]])
        weights = torch.linalg.solve(x.T @ x + torch.eye(x.shape[1]), x.T @ y)
        f_val, t_val = neighbour_features(lv, patch, grid)
        zero = t_val.pow(2).mean().item()
        fitted = (design(f_val) @ weights - t_val).pow(2).mean().item()
        print(f"level {lv.level}: {len(y)} training tokens, {len(t_val)} validation tokens: zeros {zero:.3f}, "
              f"neighbour fit {fitted:.3f} ({fitted / zero:.2f}x zeros)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
