"""Summary statistics for the downstream protocol: spread over seeds and the paired bootstrap.

A *cell* is one (test volume, seed) pair; its value is the volume's Dice (mean over the classes present in
its ground truth, or one class's Dice). Two arms are compared on the cells both have: the per-cell
differences are resampled with replacement (cells are the unit, so volumes and seeds are both resampled),
and the interval is the percentile interval of the resampled mean difference.
"""

from __future__ import annotations

import math
from typing import Any, Hashable

import numpy as np

Cell = tuple[str, int]  # (test volume name, seed)


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof 1; None for one value), min, max and n of ``values``."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "min": float(min(v)), "max": float(max(v)), "n": len(v)}


def paired_differences(a: dict[Hashable, float | None], b: dict[Hashable, float | None],
                       pairing: dict[Hashable, Hashable] | None = None) -> np.ndarray:
    """a[cell] - b[pairing[cell]] over the cells where both values exist (sorted by cell, float64).

    ``pairing`` maps a cell of ``a`` to the cell of ``b`` it is compared with (default: the same cell).
    """
    out = []
    for cell in sorted(a):
        other = pairing.get(cell) if pairing is not None else cell
        va, vb = a.get(cell), b.get(other)
        if va is not None and vb is not None:
            out.append(float(va) - float(vb))
    return np.asarray(out, dtype=np.float64)


def bootstrap_mean(diffs: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                   level: float = 0.95) -> dict[str, Any]:
    """Mean of ``diffs`` and its percentile bootstrap interval.

    diffs: (n,) per-cell differences. Draws ``n_boot`` resamples of n cells with replacement from
    ``np.random.default_rng(seed)`` (one (n_boot, n) index draw) and takes the (1-level)/2 and (1+level)/2
    quantiles (numpy's default linear interpolation) of the resampled means.
    """
    diffs = np.asarray(diffs, dtype=np.float64)
    n = len(diffs)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n_cells": 0, "n_boot": n_boot, "level": level}
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(diffs.mean()), "low": float(lo), "high": float(hi), "n_cells": n, "n_boot": n_boot,
            "level": level, "excludes_zero": bool(lo > 0 or hi < 0)}


def rotated_seeds(cells: list[Cell]) -> dict[Cell, Cell]:
    """Pair each (volume, seed) with (volume, next seed) in cyclic order: the scratch-vs-scratch noise floor
    compares runs that differ only in their seed, cell for cell, like every arm-vs-scratch comparison."""
    seeds = sorted({s for _, s in cells})
    if len(seeds) < 2:
        return {}
    nxt = {s: seeds[(i + 1) % len(seeds)] for i, s in enumerate(seeds)}
    return {(v, s): (v, nxt[s]) for v, s in cells}


__all__ = ["bootstrap_mean", "paired_differences", "rotated_seeds", "spread"]
