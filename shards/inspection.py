"""``inspect``: per-dataset table of counts, shapes, spacings and HU statistics; PNG montage of mid-slices."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mim_scale.shards.format import decode_sample, read_manifest
from mim_scale.shards.verify import iter_shard_samples


def collect(path: str | Path, max_montage: int = 16) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[str, np.ndarray]]]:
    """-> (dataset -> list of sample metadata, [(key, axial mid-slice (H, W))] for the first ``max_montage``)."""
    manifest = read_manifest(path)
    root = Path(manifest["root"])
    metas: dict[str, list[dict[str, Any]]] = defaultdict(list)
    slices: list[tuple[str, np.ndarray]] = []
    for shard in manifest["shards"]:
        for sample in iter_shard_samples(root / shard["url"]):
            vol, meta = decode_sample(sample)
            metas[meta["dataset"]].append(meta)
            if len(slices) < max_montage:
                slices.append((meta["key"], vol[vol.shape[0] // 2]))
    return dict(metas), slices


def _dist(values: list[float]) -> str:
    a = np.asarray(values, dtype=np.float64)
    return f"{a.min():.0f}/{np.median(a):.0f}/{a.max():.0f}"


def table(metas: dict[str, list[dict[str, Any]]]) -> str:
    """Text table: one row per dataset (count; min/median/max of D, H, W; spacings; mean HU; HU p01/p99)."""
    head = f"{'dataset':<16} {'n':>6} {'D min/med/max':>15} {'H min/med/max':>15} {'W min/med/max':>15} {'spacing':>14} {'mean HU':>14} {'p01..p99 HU':>14}"
    rows = [head, "-" * len(head)]
    for name, ms in sorted(metas.items()):
        shapes = np.asarray([m["shape"] for m in ms])
        spacings = sorted({"x".join(f"{s:g}" for s in m["spacing"]) for m in ms})
        mean = [m["hu_stats"]["mean"] for m in ms]
        p01 = np.median([m["hu_stats"]["p01"] for m in ms])
        p99 = np.median([m["hu_stats"]["p99"] for m in ms])
        rows.append(
            f"{name:<16} {len(ms):>6} {_dist(shapes[:, 0]):>15} {_dist(shapes[:, 1]):>15} {_dist(shapes[:, 2]):>15} "
            f"{','.join(spacings)[:14]:>14} {_dist(mean):>14} {f'{p01:.0f}..{p99:.0f}':>14}"
        )
    return "\n".join(rows)


def montage(slices: list[tuple[str, np.ndarray]], png: Path, hu_window: tuple[float, float] = (-1000.0, 1000.0)) -> Path:
    """Grid of axial mid-slices (HU window), titled by sample key, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(slices), 1)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (key, sl) in zip(axes.ravel(), slices):
        ax.imshow(sl, cmap="gray", vmin=hu_window[0], vmax=hu_window[1])
        ax.set_title(key[:12], fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png
