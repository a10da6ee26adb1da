"""A fixed validation set and per-level validation losses, so that runs can be compared.

A validation set is a few crops and every mask of their views, drawn once from a seed and saved
(safetensors, no pickle): the same crops and masks are evaluated every N steps, on any device.
It holds two mask draws: ``draw`` for the configured MiM levels and ``draw_mae`` (one level,
random masking at the level-1 ratio), so that a MiM model and the plain-MAE baseline can both be
scored on the same masked level-1 views (:func:`mae_task_loss`).

File layout (``.safetensors``): tensors ``crops`` (n, C, S, S, S) float32, ``draw.<name>`` and
``draw_mae.<name>`` int64 (see :class:`MaskDraw`); metadata ``format = "mim-scale-valset"``,
``version = "1"``, ``model`` / ``masking`` (JSON of the config sections it was drawn for), ``seed``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mim_scale.config import Config
from mim_scale.errors import UserFacingError
from mim_scale.model.views import MaskDraw, draw_masks, make_views

FORMAT = "mim-scale-valset"
VERSION = "1"


# -- crops from a CT volume ----------------------------------------------------------------------

def load_ct_hu(path: str | Path) -> np.ndarray:
    """A NIfTI CT volume in Hounsfield units, float32 (D, H, W) in the file's voxel order."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"{path}: no such CT file")
    try:
        vol = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported with the file named
        raise UserFacingError(f"{path}: cannot read as NIfTI: {exc}") from exc
    if vol.ndim != 3:
        raise UserFacingError(f"{path}: expected a 3D volume, got shape {vol.shape}")
    return vol


def random_crops(volume_hu: np.ndarray, size: int, count: int, rng: np.random.Generator,
                 hu_min: float = -1000.0, hu_max: float = 1000.0) -> torch.Tensor:
    """``count`` random size^3 crops (padded with air where the volume is smaller), HU window
    [hu_min, hu_max] mapped to [0, 1] -> (count, 1, size, size, size) float32."""
    if volume_hu.ndim != 3:
        raise ValueError(f"volume must be (D, H, W), got {volume_hu.shape}")
    pad = [(0, max(0, size - s)) for s in volume_hu.shape]
    vol = np.pad(volume_hu, pad, constant_values=-1000.0) if any(p[1] for p in pad) else volume_hu
    out = np.empty((count, 1, size, size, size), dtype=np.float32)
    for i in range(count):
        o = [int(rng.integers(0, s - size + 1)) for s in vol.shape]
        crop = vol[o[0]:o[0] + size, o[1]:o[1] + size, o[2]:o[2] + size]
        out[i, 0] = (np.clip(crop, hu_min, hu_max) - hu_min) / (hu_max - hu_min)
    return torch.from_numpy(out)


# -- the validation set --------------------------------------------------------------------------

@dataclass
class ValidationSet:
    """crops: (n, C, S, S, S) in [0, 1]; draw / draw_mae: the masks of every view of every crop."""

    crops: torch.Tensor
    draw: MaskDraw
    draw_mae: MaskDraw
    model: dict
    masking: dict
    seed: int
    source: str = "seen"  # "held-out": drawn from volumes never trained on (data.validation_shards); "seen"

    def __len__(self) -> int:
        return self.crops.shape[0]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from mim_scale.fileutil import atomic_path

        path = Path(path)
        tensors = {"crops": self.crops.contiguous()}
        tensors.update({f"draw.{k}": v.contiguous() for k, v in self.draw.tensors().items()})
        tensors.update({f"draw_mae.{k}": v.contiguous() for k, v in self.draw_mae.tensors().items()})
        meta = {"format": FORMAT, "version": VERSION, "model": json.dumps(self.model), "masking": json.dumps(self.masking),
                "seed": str(self.seed), "source": self.source}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, cfg: Config | None = None) -> "ValidationSet":
        """Read a saved set; with ``cfg``, check it was drawn for the same view geometry and masking."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserFacingError(f"{path}: no such validation set file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001
            raise UserFacingError(f"{path}: not a readable safetensors validation set: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise UserFacingError(f"{path}: not a mim-scale validation set version {VERSION} "
                                  f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
        vset = cls(crops=tensors["crops"],
                   draw=MaskDraw(**{k[5:]: v for k, v in tensors.items() if k.startswith("draw.")}),
                   draw_mae=MaskDraw(**{k[9:]: v for k, v in tensors.items() if k.startswith("draw_mae.")}),
                   model=json.loads(meta["model"]), masking=json.loads(meta["masking"]), seed=int(meta["seed"]),
                   source=meta.get("source", "seen"))
        if cfg is not None:
            vset.check(cfg, where=str(path))
        return vset

    def check(self, cfg: Config, where: str = "validation set") -> None:
        geometry = ("view_size", "in_channels", "widths")
        for key in geometry:
            want = _jsonable(getattr(cfg.model, key))
            if self.model.get(key) != want:
                raise UserFacingError(f"{where}: drawn for model.{key} = {self.model.get(key)}, the config has {want}")
        if self.masking != _jsonable(dataclasses.asdict(cfg.masking)):
            raise UserFacingError(f"{where}: drawn for masking {self.masking}, the config has "
                                  f"{dataclasses.asdict(cfg.masking)}")


def _jsonable(value):
    return json.loads(json.dumps(value))


def build_validation_set(volumes_hu: list[np.ndarray], cfg: Config, num_crops: int, seed: int = 0) -> ValidationSet:
    """Draw ``num_crops`` crops (spread over the volumes in turn) and all their masks from ``seed``."""
    if not volumes_hu:
        raise ValueError("build_validation_set needs at least one volume")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    rng = np.random.default_rng(seed)
    size = cfg.data.crop_size
    crops = torch.cat([random_crops(volumes_hu[i % len(volumes_hu)], size, 1, rng, cfg.data.hu_min, cfg.data.hu_max)
                       for i in range(num_crops)])
    return validation_set_from_crops(crops, cfg, seed)


def validation_set_from_crops(crops: torch.Tensor, cfg: Config, seed: int = 0) -> ValidationSet:
    """A validation set from crops already cut (e.g. the first batches of the data stream):
    crops (n, C, S, S, S) in [0, 1]; the masks are drawn on the CPU from ``seed``."""
    s, c = cfg.data.crop_size, cfg.model.in_channels
    if crops.dim() != 5 or tuple(crops.shape[1:]) != (c, s, s, s):
        raise ValueError(f"crops must be (n, {c}, {s}, {s}, {s}), got {tuple(crops.shape)}")
    crops = crops.detach().to("cpu", torch.float32).contiguous()
    gen = torch.Generator().manual_seed(seed)
    draw = draw_masks(crops.shape[0], cfg.model, cfg.masking, "cpu", gen)
    mae_masking = dataclasses.replace(cfg.masking, levels=1)
    draw_mae = draw_masks(crops.shape[0], cfg.model, mae_masking, "cpu", gen)
    return ValidationSet(crops, draw, draw_mae, _jsonable(dataclasses.asdict(cfg.model)),
                         _jsonable(dataclasses.asdict(cfg.masking)), seed)


def select_draw(draw: MaskDraw, start: int, stop: int) -> MaskDraw:
    """The masks of crops ``start:stop`` (rows of every level are crop-major)."""
    out = {}
    n = None
    for name, t in draw.tensors().items():
        if name in ("octants", "ids1"):
            n = t.shape[0]
    for name, t in draw.tensors().items():
        per_crop = t.shape[0] // n
        out[name] = t[start * per_crop:stop * per_crop]
    return MaskDraw(**out)


@torch.no_grad()
def validation_losses(model, vset: ValidationSet, batch_size: int = 1) -> dict[str, float]:
    """Per-level masked reconstruction loss (and alignment) of ``model`` on the fixed set.

    Returns ``{"val_rec_l1": ..., ["val_rec_l2", "val_rec_l3", "val_align_12", "val_align_23"], "val_total"}``,
    each the mean over crops. The model is put in eval mode for the pass and restored after. The alignment
    heads normalise over each batch's pairs (BatchNorm on batch statistics), so the alignment losses depend on
    ``batch_size``: compare them only at the same one (the engine validates one crop at a time).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    try:
        for start in range(0, len(vset), batch_size):
            stop = min(start + batch_size, len(vset))
            out = model(vset.crops[start:stop].to(device), draw=select_draw(vset.draw, start, stop))
            for key in out:
                if key.startswith(("rec_", "align_")) or key == "total":
                    sums[f"val_{key}"] = sums.get(f"val_{key}", 0.0) + float(out[key]) * (stop - start)
    finally:
        model.train(was_training)
    return {k: v / len(vset) for k, v in sums.items()}


@torch.no_grad()
def mae_task_loss(model, vset: ValidationSet, batch_size: int = 1) -> float:
    """Masked reconstruction loss on the level-1 views under the saved random (MAE) masks.

    Works for a MiM model and a plain-MAE model alike (same backbone): the common yardstick of
    the MiM-vs-MAE comparison.
    """
    from mim_scale.model.ops import masked_norm_pix_mse

    cfg = model.cfg
    mae_masking = dataclasses.replace(cfg.masking, levels=1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    try:
        for start in range(0, len(vset), batch_size):
            stop = min(start + batch_size, len(vset))
            levels = make_views(vset.crops[start:stop].to(device), cfg.model, mae_masking,
                                draw=select_draw(vset.draw_mae, start, stop))
            (_, pred), = model.encode_decode(levels)
            loss = masked_norm_pix_mse(pred, levels[0].x, levels[0].mask, model.patch_size, cfg.loss.norm_pix_eps)
            total += float(loss) * (stop - start)
    finally:
        model.train(was_training)
    value = total / len(vset)
    if not math.isfinite(value):
        raise FloatingPointError(f"MAE-task validation loss is {value}")
    return value
