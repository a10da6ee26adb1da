"""Pictures of what the model learns: reconstructions and loss curves as PNG files.

Drawn with matplotlib's Agg canvas on a private ``Figure`` (no pyplot global state, so it is safe in
training workers and threads). Files are written to a temporary name and renamed, so a reader never
sees half a PNG.

Slices are axial: the middle index of ``D`` of a ``(N, C, D, H, W)`` view, shown with ``H`` (towards
posterior) downwards and ``W`` (towards patient left) to the right, i.e. the radiological convention
for the shards' canonical orientation (``mim_scale.shards.format``).

The picture of the method (:func:`method_reconstruction` + :func:`save_reconstruction_png`): one chain of
views with tissue in it (a level-1 crop, one of its level-2 octants, one of that octant's level-3 patches,
each with mean HU above :data:`TISSUE_MEAN_HU`), shown in Hounsfield units through a named window, each
level's slice passing through its child, whose place is outlined; masked tokens are shaded.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Columns in display order; whichever of them a level holds are drawn.
COLUMNS = ("input", "masked", "pred", "composite")
COLUMN_TITLES = {"input": "input", "masked": "masked (visible)", "pred": "predicted", "composite": "composite"}
LOSS_ORDER = ("rec_l1", "rec_l2", "rec_l3", "align_12", "align_23", "total")
TISSUE_MEAN_HU = -900.0  # a view whose mean is at or below this is (nearly) all air: not worth a picture
BODY_MEAN_HU = -500.0  # voxels above this are inside the body: chains whose views are mostly such are preferred
# named display windows, (level, width) in HU; "abdomen" is the usual soft-tissue window of abdominal CT
WINDOWS = {"abdomen": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0), "wide": (0.0, 2000.0)}
DEFAULT_WINDOW = "abdomen"
CHILD_COLOURS = {"l1": "#ff9f1c", "l2": "#2ec4b6"}  # outline of level 2 in level 1, of level 3 in level 2
MASK_SHADE = (0.85, 0.15, 0.55, 0.35)  # RGBA over masked tokens


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
    recon: Mapping[str, Mapping[str, object]], max_views: int = 1,
    slices: Mapping[str, int] | None = None,
) -> list[tuple[str, int, list[tuple[str, np.ndarray]]]]:
    """The slices :func:`save_reconstruction_png` draws: ``[(level, view, [(column, (H, W) slice)])]``.

    recon: ``{"l1": {"input": (N, C, V, V, V), "masked": ..., "pred": ..., ...}, ...}`` (the output of
    ``MiMModel.reconstruct``); levels are sorted by their number, any subset of levels and of the
    ``COLUMNS`` may be present, other keys (``mask``) are ignored. ``slices``: the axial index to show per
    level (default the middle one, ``D // 2``).
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
        z = (slices or {}).get(level)
        for view in range(min(n, max_views)):
            rows.append((level, view, [(c, vols[c][view, 0, z] if z is not None else mid_axial(vols[c], view))
                                       for c in cols]))
    return rows


def _atomic_save(fig, path: Path, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mim_scale.fileutil import atomic_path

    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def save_reconstruction_png(
    recon: Mapping[str, Mapping[str, object]],
    path: str | os.PathLike,
    *,
    max_views: int = 1,
    title: str | None = None,
    dpi: int = 100,
    hu_range: tuple[float, float] | None = None,
    window: str = DEFAULT_WINDOW,
    slices: Mapping[str, int] | None = None,
    children: Mapping[str, tuple[int, int, int]] | None = None,
    mean_hu: Mapping[str, float] | None = None,
) -> Path:
    """One row per level (and view, up to ``max_views``), one column per image kind, axial slices.

    Without ``hu_range`` every panel of a row shares the gray scale of its input slice. With it
    (``(hu_min, hu_max)``, the data's window that [0, 1] stands for) the slices are shown in HU through the
    named display ``window`` (:data:`WINDOWS`), named in the title. ``slices``: the axial index per level;
    ``children``: per level, ``(h0, w0, size)`` voxels of this level's view where the next level's view sits
    (outlined in every panel of the row); masked tokens (``mask`` == 0) are shaded in the ``masked``
    column. :func:`save_method_png` fills these from a :class:`MethodPicture`. Returns ``path``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = reconstruction_panels(recon, max_views=max_views, slices=slices)
    if hu_range is not None and window not in WINDOWS:
        raise ValueError(f"window {window!r}: not one of {', '.join(WINDOWS)}")
    ncols = max(len(cols) for _, _, cols in rows)
    head = title or ""
    if hu_range is not None:
        level, width = WINDOWS[window]
        head = (head + "\n" if head else "") + (f"HU window '{window}': W {width:g} L {level:g} "
                                                 f"({level - width / 2:g} to {level + width / 2:g} HU)")
    fig = Figure(figsize=(2.4 * ncols + 0.6, 2.5 * len(rows) + (0.5 * (head.count("\n") + 1) if head else 0)),
                 layout="constrained")
    if head:
        fig.suptitle(head, fontsize=10)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (level, view, cols) in enumerate(rows):
        ref = dict(cols).get("input", cols[0][1])
        if hu_range is not None:
            lo_hu, hi_hu = hu_range
            to_shown = lambda img: img * (hi_hu - lo_hu) + lo_hu  # noqa: E731 - [0, 1] -> HU
            wl, ww = WINDOWS[window]
            lo, hi = wl - ww / 2, wl + ww / 2
        else:
            to_shown = lambda img: img  # noqa: E731
            lo, hi = float(np.min(ref)), float(np.max(ref))
            if hi <= lo:
                hi = lo + 1.0
        keep = _mask_slice(recon[level], view, (slices or {}).get(level))
        box = (children or {}).get(level)
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cols):
                ax.axis("off")
                continue
            name, img = cols[c]
            ax.imshow(to_shown(img), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if name == "masked" and keep is not None and keep.shape == img.shape:
                shade = np.zeros(img.shape + (4,), dtype=np.float32)
                shade[keep < 0.5] = MASK_SHADE
                ax.imshow(shade, interpolation="nearest")
            if box is not None:
                h0, w0, size = box
                ax.add_patch(Rectangle((w0 - 0.5, h0 - 0.5), size, size, fill=False, lw=1.8, clip_on=False,
                                       edgecolor=CHILD_COLOURS.get(level, "#ff9f1c")))
            parent = _parent_level(level)
            if children and parent in children:  # this row is the outlined child of the row above: frame it
                for spine in ax.spines.values():
                    spine.set_edgecolor(CHILD_COLOURS.get(parent, "#ff9f1c"))
                    spine.set_linewidth(2.5)
            prev = rows[r - 1][2] if r else []
            if c >= len(prev) or prev[c][0] != name:  # title a column where its kind first appears
                ax.set_title(COLUMN_TITLES.get(name, name), fontsize=9)
            if c == 0:
                label = _level_title(level) + (f", view {view}" if max_views > 1 else "")
                if level in LEVEL_NOTES and children is not None:
                    label += "\n" + LEVEL_NOTES[level]
                if mean_hu and level in mean_hu:
                    label += f"\nmean {mean_hu[level]:.0f} HU"
                ax.set_ylabel(label, fontsize=8)
    return _atomic_save(fig, Path(path), dpi)


LEVEL_NOTES = {"l1": "crop, 2x down", "l2": "masked octant, full res", "l3": "masked patch, upsampled"}


def _parent_level(level: str) -> str:
    m = re.search(r"(\d+)$", level)
    return f"{level[:m.start()]}{int(m.group(1)) - 1}" if m else ""


def _mask_slice(entry: Mapping[str, object], view: int, z: int | None) -> np.ndarray | None:
    if "mask" not in entry:
        return None
    mask = _as_numpy(entry["mask"], "mask")
    return mask[view, 0, z] if z is not None else mid_axial(mask, view)


# -- the picture of the method: one chain of views with tissue -----------------------------------------------

@dataclass
class MethodPicture:
    """One crop's chain of views for :func:`save_method_png`.

    recon: ``MiMModel.reconstruct`` of that crop, one view per level (the chain's); slices: the axial index
    shown per level (each passes through the next level's view); children: per level but the last,
    ``(h0, w0, size)`` voxels where the next level's view sits; mean_hu: each level's input view's mean HU;
    crop: the chain's crop in the batch; tissue: every ``mean_hu`` above :data:`TISSUE_MEAN_HU`.
    """

    recon: dict
    slices: dict[str, int]
    children: dict[str, tuple[int, int, int]]
    mean_hu: dict[str, float]
    hu_range: tuple[float, float]
    crop: int
    tissue: bool


def method_reconstruction(model, crops, *, seed: int = 0, tries: int = 8, window: str = DEFAULT_WINDOW) -> MethodPicture:
    """Reconstruct one chain of views with tissue from ``crops`` (B, C, 2V, 2V, 2V) in [0, 1].

    Masks are drawn from ``seed`` (up to ``tries`` draws) exactly as in training; among every (crop,
    level-2 octant, level-3 patch) chain of a draw, the chosen one has every view's mean HU above
    :data:`TISSUE_MEAN_HU` (else the chain whose emptiest view is densest), then the largest share of voxels
    above :data:`BODY_MEAN_HU` in its emptiest view (inside the body, not the skin line against air), then
    the level-3 patch with the most structure visible in the display ``window`` (standard deviation of its HU
    clipped to the window: soft-tissue contrast, not a bone edge that the window shows as white). The model runs once, on that crop, with the
    draw reordered so that the chain's views come first (one forward per call: under ZeRO-3 every rank
    must call this, each on its own crops). HU means are read from the crop (a level-1 view is the crop's
    2x2x2 means, a level-3 view the patch upsampled), so the choice costs no forward.
    """
    import torch

    from mim_scale.model.views import draw_masks

    cfg = model.cfg
    hu = (float(cfg.data.hu_min), float(cfg.data.hu_max))
    levels, v, p = cfg.masking.levels, cfg.model.view_size, cfg.model.patch_size
    g = v // p
    x = crops.detach().float()
    if x.dim() != 5 or x.shape[2:] != (2 * v,) * 3:
        raise ValueError(f"crops must be (B, C, {2 * v}, {2 * v}, {2 * v}), got {tuple(x.shape)}")
    to_hu = lambda t: t * (hu[1] - hu[0]) + hu[0]  # noqa: E731
    b = x.shape[0]
    x = x[:, :1]  # channel 0 carries the CT
    mean1 = to_hu(x.mean(dim=(1, 2, 3, 4)))  # (B,)
    octs = x.reshape(b, 2, v, 2, v, 2, v)
    mean_oct = to_hu(octs.mean(dim=(2, 4, 6))).reshape(b, 8)  # octant o = 4*od + 2*oh + ow
    pat = x.reshape(b, 2 * g, p, 2 * g, p, 2 * g, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, 2 * g, 2 * g, 2 * g, -1)
    level, width = WINDOWS[window]
    shown = to_hu(pat).clamp(level - width / 2, level + width / 2)
    mean_pat, std_pat = to_hu(pat.mean(-1)), shown.std(-1)  # (B, 2g, 2g, 2g) per crop token
    body = (x > (BODY_MEAN_HU - hu[0]) / (hu[1] - hu[0])).float()  # voxels denser than BODY_MEAN_HU
    body1 = body.mean(dim=(1, 2, 3, 4))
    body_oct = body.reshape(b, 2, v, 2, v, 2, v).mean(dim=(2, 4, 6)).reshape(b, 8)
    body_pat = body.reshape(b, 2 * g, p, 2 * g, p, 2 * g, p).mean(dim=(2, 4, 6))
    generator = torch.Generator(device=crops.device).manual_seed(int(seed))
    best = None
    for _ in range(max(1, tries)):
        draw = draw_masks(b, cfg.model, cfg.masking, crops.device, generator)
        for cand in _chains(draw, levels, b, g):
            crop_i, k_i, j_i, octant, token = cand
            means, inside = [float(mean1[crop_i])], [float(body1[crop_i])]
            structure = 0.0
            if levels >= 2:
                means.append(float(mean_oct[crop_i, octant]))
                inside.append(float(body_oct[crop_i, octant]))
            if levels >= 3:
                cz, cy, cx = _crop_token(octant, token, g)
                means.append(float(mean_pat[crop_i, cz, cy, cx]))
                inside.append(float(body_pat[crop_i, cz, cy, cx]))
                structure = float(std_pat[crop_i, cz, cy, cx])
            tissue = min(means) > TISSUE_MEAN_HU
            # then: views inside the body (in steps of a tenth of their voxels), then the most structure
            score = (tissue, round(min(inside), 1), structure if tissue else min(means))
            if best is None or score > best[0]:
                best = (score, draw, cand, means)
        if best[0][0]:
            break
    _, draw, (crop_i, k_i, j_i, octant, token), means = best
    sub = _chain_draw(draw, levels, crop_i, k_i, j_i)
    recon = model.reconstruct(crops[crop_i:crop_i + 1], draw=sub, max_views=1)
    names = [f"l{n}" for n in range(1, levels + 1)]
    slices, children = {}, {}
    od, oh, ow = octant // 4, (octant // 2) % 2, octant % 2
    if levels >= 3:
        td, th, tw = token // (g * g), (token // g) % g, token % g
        slices["l3"] = v // 2
        slices["l2"] = td * p + p // 2  # through the patch's centre (the level-3 view's middle slice)
        children["l2"] = (th * p, tw * p, p)
    elif levels == 2:
        slices["l2"] = v // 2
    if levels >= 2:
        slices["l1"] = (od * v + slices["l2"]) // 2  # the same plane of the crop, at half resolution
        children["l1"] = (oh * v // 2, ow * v // 2, v // 2)
    else:
        slices["l1"] = v // 2
    return MethodPicture(recon=recon, slices=slices, children=children, mean_hu=dict(zip(names, means)),
                         hu_range=hu, crop=crop_i, tissue=min(means) > TISSUE_MEAN_HU)


def save_method_png(picture: MethodPicture, path: str | os.PathLike, *, title: str | None = None,
                    window: str = DEFAULT_WINDOW, dpi: int = 100) -> Path:
    """:func:`save_reconstruction_png` of a :func:`method_reconstruction`: HU window, hierarchy, shading."""
    note = None if picture.tissue else f"no chain above {TISSUE_MEAN_HU:g} HU in these crops: the densest shown"
    full = "\n".join(t for t in (title, note) if t)
    return save_reconstruction_png(picture.recon, path, title=full or None, dpi=dpi, hu_range=picture.hu_range,
                                   window=window, slices=picture.slices, children=picture.children,
                                   mean_hu=picture.mean_hu)


def _chains(draw, levels: int, batch: int, g: int):
    """Every (crop, level-2 index, level-3 index, octant, token) of a draw (indices -1 where the level is off)."""
    if levels == 1:
        for i in range(batch):
            yield i, -1, -1, 0, 0
        return
    octants = draw.octants.tolist()
    k = len(octants[0])
    token3 = draw.token3.tolist() if levels >= 3 else None
    for i in range(batch):
        for a in range(k):
            if token3 is None:
                yield i, a, -1, octants[i][a], 0
                continue
            for j, t in enumerate(token3[i * k + a]):
                yield i, a, j, octants[i][a], t


def _crop_token(octant: int, token: int, g: int) -> tuple[int, int, int]:
    """Level-2 token ``token`` of octant ``octant`` -> its (z, y, x) index in the crop's (2g)^3 token grid."""
    return ((octant // 4) * g + token // (g * g), ((octant // 2) % 2) * g + (token // g) % g,
            (octant % 2) * g + token % g)


def _chain_draw(draw, levels: int, crop: int, k_i: int, j_i: int):
    """The masks of crop ``crop`` alone, reordered so that level-2 view ``k_i`` and its level-3 view ``j_i``
    come first (view order changes nothing else: the views are the same volumes under the same masks)."""
    from mim_scale.model.views import MaskDraw

    sub = draw_for_crop(draw, levels, crop)
    if levels == 1:
        return sub
    k = sub.octants.shape[1]
    order2 = [k_i] + [a for a in range(k) if a != k_i]
    out = MaskDraw(octants=sub.octants[:, order2], ids2=sub.ids2[order2])
    if levels >= 3:
        picks = sub.token3.shape[1]
        order3 = [j_i] + [j for j in range(picks) if j != j_i]
        token3 = sub.token3[order2].clone()
        token3[0] = token3[0][order3]
        ids3 = sub.ids3.reshape(k, picks, -1)[order2].clone()
        ids3[0] = ids3[0][order3]
        out.token3, out.ids3 = token3, ids3.reshape(k * picks, -1)
    return out


def draw_for_crop(draw, levels: int, crop: int):
    """The masks of one crop of a batch's :class:`~mim_scale.model.views.MaskDraw` (views are crop-major)."""
    from mim_scale.model.views import MaskDraw

    if levels == 1:
        return MaskDraw(ids1=draw.ids1[crop:crop + 1])
    k = draw.octants.shape[1]
    out = MaskDraw(octants=draw.octants[crop:crop + 1], ids2=draw.ids2[crop * k:(crop + 1) * k])
    if levels >= 3:
        picks = draw.token3.shape[1]
        out.token3 = draw.token3[crop * k:(crop + 1) * k]
        out.ids3 = draw.ids3[crop * k * picks:(crop + 1) * k * picks]
    return out


# -- the predict-zeros yardstick -------------------------------------------------------------------------

def zero_prediction_losses(cfg, vset) -> dict[str, float]:
    """``{"rec_l1": ..., ...}``: each level's masked reconstruction loss if the model predicted zeros (the
    normalised target's mean) on the validation set ``vset``: what a model that learned nothing scores.
    Views only (no model), one crop at a time to bound memory."""
    import torch

    from mim_scale.model.ops import norm_pix_target
    from mim_scale.model.views import make_views

    levels = cfg.masking.levels
    sums: dict[int, list[float]] = {}
    with torch.no_grad():
        for i in range(vset.crops.shape[0]):
            draw = draw_for_crop(vset.draw, levels, i)
            for lv in make_views(vset.crops[i:i + 1].float(), cfg.model, cfg.masking, draw=draw):
                per_token = norm_pix_target(lv.x, cfg.model.patch_size, cfg.loss.norm_pix_eps).pow(2).mean(-1)
                acc = sums.setdefault(lv.level, [0.0, 0.0])
                acc[0] += float((per_token * lv.mask).sum())
                acc[1] += float(lv.mask.sum())
    return {f"rec_l{n}": a / c for n, (a, c) in sorted(sums.items()) if c > 0}


def zero_losses_for_run(cfg, run_dir: str | os.PathLike) -> dict[str, float] | None:
    """:func:`zero_prediction_losses` on the run's saved validation set (None when it has none), cached in
    ``RUN/pictures/zero_losses.json`` against the set file's size and modification time."""
    import json

    from mim_scale.engine.validate import validation_set_path
    from mim_scale.model.validation import ValidationSet

    path = validation_set_path(cfg, Path(run_dir))
    if not path.is_file():
        return None
    stat = path.stat()
    stamp = {"validation_set": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = Path(run_dir) / "pictures" / "zero_losses.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp and isinstance(cached.get("losses"), dict):
            return {str(k): float(v) for k, v in cached["losses"].items()}
    except (OSError, ValueError, TypeError):
        pass
    losses = zero_prediction_losses(cfg, ValidationSet.load(path, cfg))
    from mim_scale.fileutil import write_atomic

    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache, json.dumps({"stamp": stamp, "losses": losses}, indent=1))
    return losses


def loss_keys(history: Sequence[Mapping[str, object]]) -> list[str]:
    """Loss keys present in ``history``: the model's keys in their order, then any other ``*loss*`` key."""
    seen = {k for h in history for k in h}
    keys = [k for k in LOSS_ORDER if k in seen]
    keys += sorted(k for k in seen if k not in keys and "loss" in k and k != "step")
    return keys


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """Exponential moving average with the start-up bias removed (TensorBoard's smoothing):
    ``s_i = w s_{i-1} + (1 - w) x_i``, divided by ``1 - w^(i+1)``. values: (n,) finite -> (n,)."""
    out = np.empty(len(values), dtype=np.float64)
    acc = 0.0
    for i, x in enumerate(values):
        acc = weight * acc + (1.0 - weight) * float(x)
        out[i] = acc / (1.0 - weight ** (i + 1))
    return out


def ema_weight(points: int) -> float:
    """The smoothing for a curve of ``points`` records: about 1/25 of the curve per time constant, so that
    the batch-to-batch swing (volumes of different content) averages out at any run length; 0 .. 0.98."""
    return float(min(0.98, max(0.0, 1.0 - 25.0 / max(points, 1))))


def save_loss_curves_png(
    history: Sequence[Mapping[str, object]],
    path: str | os.PathLike,
    *,
    keys: Sequence[str] | None = None,
    log_scale: bool = True,
    title: str | None = None,
    dpi: int = 100,
    zeros: Mapping[str, float] | None = None,
) -> Path:
    """One small plot per loss key against ``step``: raw points faint, their EMA (:func:`ema_weight`) bold.

    history: ``[{"step": 1, "rec_l1": 0.9, ...}, ...]``; records without a key leave a gap; NaN/Inf
    values are marked with a red tick at the bottom of the plot, since they cannot be drawn. A key's
    validation values (``val_<key>``, where present) are drawn on the same plot as points, labelled with the
    set they were measured on (the records' ``validation_set``: "held-out" or "seen"). ``zeros``: per key,
    the loss of predicting zeros on the validation set (:func:`zero_prediction_losses`), a dashed line.
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
    sets = [str(h["validation_set"]) for h in history if h.get("validation_set")]
    val_label = f"validation ({sets[-1]})" if sets else "validation"
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
        weight = ema_weight(int(finite.sum()))
        ax.plot(steps[finite], vals[finite], lw=0.6, alpha=0.3, color="C0", label="train (raw)")
        if finite.any():
            ax.plot(steps[finite], ema(vals[finite], weight), lw=1.6, color="C0", label=f"train (EMA {weight:.2f})")
        # the same loss on the run's fixed validation set, where the run validated
        val = [(float(h["step"]), float(h[f"val_{key}"])) for h in history if h.get(f"val_{key}") is not None]
        val = [(s, v) for s, v in val if math.isfinite(v)]
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, lw=0.8, color="C1", label=val_label)
        zero = (zeros or {}).get(key)
        if zero is not None and math.isfinite(zero) and zero > 0:
            ax.axhline(zero, color="0.4", ls="--", lw=1.0, label=f"predict zeros, validation set ({zero:.3f})")
        ax.legend(fontsize=6)
        positive = bool(finite.any() and (vals[finite] > 0).all())
        if log_scale and positive:
            from matplotlib.ticker import FormatStrFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))  # 0.6, not 6 x 10^-1
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        if (~finite).any():
            for s in steps[~finite]:
                ax.axvline(s, color="red", lw=0.8, ymax=0.05)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(True, alpha=0.3, which="both")
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    return _atomic_save(fig, Path(path), dpi)
