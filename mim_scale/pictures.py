"""Pictures of what the model learns: reconstructions and loss curves as PNG files.

Drawn with matplotlib's Agg canvas on a private ``Figure`` (no pyplot global state, so it is safe in
training workers and threads). Files are written to a temporary name and renamed, so a reader never
sees half a PNG.

Slices are axial: the middle index of ``D`` of a ``(N, C, D, H, W)`` view, shown with ``H`` (towards
posterior) downwards and ``W`` (towards patient left) to the right, i.e. the radiological convention
for the shards' canonical orientation (``mim_scale.shards.format``).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Columns in display order; whichever of them a level holds are drawn.
COLUMNS = ("input", "masked", "pred", "composite")
COLUMN_TITLES = {"input": "input", "masked": "masked (visible)", "pred": "predicted", "composite": "composite"}
LOSS_ORDER = ("rec_l1", "rec_l2", "rec_l3", "align_12", "align_23", "total")


def _as_numpy(value, where: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, possibly bf16 / on a device
        value = value.detach().float().cpu().numpy()
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 4:  # (N, D, H, W): one channel
        arr = arr[:, None]
    if arr.ndim != 5:
        raise ValueError(f"{where}: expected a (N, C, D, H, W) volume, got shape {tuple(arr.shape)}")
    return arr


def _level_sort_key(name: str) -> tuple[int, str]:
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else 1_000_000, name)


def _level_title(name: str) -> str:
    m = re.search(r"(\d+)$", name)
    return f"level {m.group(1)}" if m else name


def mid_axial(vol: np.ndarray, view: int = 0, channel: int = 0) -> np.ndarray:
    """vol: (N, C, D, H, W) -> the (H, W) slice at D // 2 of one view and channel."""
    return vol[view, channel, vol.shape[2] // 2]


def reconstruction_panels(
    recon: Mapping[str, Mapping[str, object]], max_views: int = 1
) -> list[tuple[str, int, list[tuple[str, np.ndarray]]]]:
    """The slices :func:`save_reconstruction_png` draws: ``[(level, view, [(column, (H, W) slice)])]``.

    recon: ``{"l1": {"input": (N, C, V, V, V), "masked": ..., "pred": ..., ...}, ...}`` (the output of
    ``MiMModel.reconstruct``); levels are sorted by their number, any subset of levels and of the
    ``COLUMNS`` may be present, other keys (``mask``) are ignored.
    """
    if not recon:
        raise ValueError("reconstruction is empty: no level to draw")
    rows = []
    for level in sorted(recon, key=_level_sort_key):
        entry = recon[level]
        if not isinstance(entry, Mapping):
            raise ValueError(f"reconstruction[{level!r}]: expected a dict of volumes, got {type(entry).__name__}")
        cols = [c for c in COLUMNS if c in entry]
        if not cols:
            raise ValueError(f"reconstruction[{level!r}]: none of {COLUMNS} present (keys: {sorted(entry)})")
        vols = {c: _as_numpy(entry[c], f"reconstruction[{level!r}][{c!r}]") for c in cols}
        n = min(v.shape[0] for v in vols.values())
        for view in range(min(n, max_views)):
            rows.append((level, view, [(c, mid_axial(vols[c], view)) for c in cols]))
    return rows


def _atomic_save(fig, path: Path, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_reconstruction_png(
    recon: Mapping[str, Mapping[str, object]],
    path: str | os.PathLike,
    *,
    max_views: int = 1,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """One row per level (and view, up to ``max_views``), one column per image kind, mid axial slices.

    Every panel of a row shares the gray scale of its input slice, so prediction and input compare
    directly. Returns ``path``.
    """
    from matplotlib.figure import Figure

    rows = reconstruction_panels(recon, max_views=max_views)
    ncols = max(len(cols) for _, _, cols in rows)
    fig = Figure(figsize=(2.4 * ncols, 2.5 * len(rows) + (0.4 if title else 0)), layout="constrained")
    if title:
        fig.suptitle(title)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (level, view, cols) in enumerate(rows):
        ref = dict(cols).get("input", cols[0][1])
        lo, hi = float(np.min(ref)), float(np.max(ref))
        if hi <= lo:
            hi = lo + 1.0
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cols):
                ax.axis("off")
                continue
            name, img = cols[c]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            prev = rows[r - 1][2] if r else []
            if c >= len(prev) or prev[c][0] != name:  # title a column where its kind first appears
                ax.set_title(COLUMN_TITLES.get(name, name), fontsize=9)
            if c == 0:
                label = _level_title(level) + (f", view {view}" if max_views > 1 else "")
                ax.set_ylabel(label, fontsize=9)
    return _atomic_save(fig, Path(path), dpi)


def loss_keys(history: Sequence[Mapping[str, object]]) -> list[str]:
    """Loss keys present in ``history``: the model's keys in their order, then any other ``*loss*`` key."""
    seen = {k for h in history for k in h}
    keys = [k for k in LOSS_ORDER if k in seen]
    keys += sorted(k for k in seen if k not in keys and "loss" in k and k != "step")
    return keys


def save_loss_curves_png(
    history: Sequence[Mapping[str, object]],
    path: str | os.PathLike,
    *,
    keys: Sequence[str] | None = None,
    log_scale: bool = True,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """One small plot per loss key (one curve each) against ``step``.

    history: ``[{"step": 1, "rec_l1": 0.9, ...}, ...]``; records without a key leave a gap; NaN/Inf
    values are marked with a red tick at the bottom of the plot, since they cannot be drawn. A key's
    validation values (``val_<key>``, where present) are drawn on the same plot as points.
    """
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("loss history is empty: nothing to plot")
    for i, h in enumerate(history):
        if "step" not in h:
            raise ValueError(f"loss history record {i} has no 'step': {dict(h)}")
    keys = list(keys) if keys is not None else loss_keys(history)
    if not keys:
        raise ValueError(f"loss history has no loss keys (keys: {sorted({k for h in history for k in h})})")
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 2.8 * nrows + (0.4 if title else 0)), layout="constrained")
    if title:
        fig.suptitle(title)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, key in enumerate(keys):
        ax = axes[i // ncols][i % ncols]
        pts = [(float(h["step"]), float(h[key])) for h in history if key in h and h[key] is not None]
        steps = np.array([p[0] for p in pts])
        vals = np.array([p[1] for p in pts])
        finite = np.isfinite(vals)
        ax.plot(steps[finite], vals[finite], lw=1.2, label="train")
        # the same loss on the run's fixed validation set, where the run validated
        val = [(float(h["step"]), float(h[f"val_{key}"])) for h in history if h.get(f"val_{key}") is not None]
        val = [(s, v) for s, v in val if math.isfinite(v)]
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, lw=0.8, label="validation")
            ax.legend(fontsize=7)
        positive = bool(finite.any() and (vals[finite] > 0).all())
        if log_scale and positive:
            ax.set_yscale("log")
        if (~finite).any():
            for s in steps[~finite]:
                ax.axvline(s, color="red", lw=0.8, ymax=0.05)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(True, alpha=0.3)
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    return _atomic_save(fig, Path(path), dpi)
