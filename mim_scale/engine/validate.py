"""Per-level validation loss during pre-training, on one fixed validation set.

The set (crops and every mask of their views, :mod:`mim_scale.model.validation`) is drawn once and
saved, so every evaluation of a run, and every run that points ``train.validation_set`` at the same
file, scores the same crops under the same masks. Where it comes from:

- ``train.validation_set`` names a file that exists: it is loaded and checked against the config
  (view geometry and masking must match what it was drawn for);
- otherwise ``train.validation_crops`` crops are taken from the configured shards by a stream whose
  seed is derived from ``data.seed`` but differs from the training stream's, the masks are drawn from
  ``train.seed``, and rank 0 saves the set to ``train.validation_set`` (default
  ``<run dir>/validation_set.safetensors``), where a resumed run finds it again.

Every rank builds or loads the same set and evaluates all of it: under ZeRO-3 a forward gathers
parameters collectively, so every rank must run the same forwards. The values are the same on every
rank; rank 0 writes them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from mim_scale.config import Config
from mim_scale.errors import UserFacingError
from mim_scale.model.validation import ValidationSet, validation_losses, validation_set_from_crops

log = logging.getLogger(__name__)

STREAM_SEED_OFFSET = 1_000_003  # the validation stream's seed = data.seed + this


def validation_set_path(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.train.validation_set) if cfg.train.validation_set else Path(run_dir) / "validation_set.safetensors"


def draw_validation_set(cfg: Config) -> ValidationSet:
    """``train.validation_crops`` crops (one fixed stream, one process), masks from ``train.seed``: from the
    held-out volumes of ``data.validation_shards`` when set (labelled "held-out"), else from the training shards
    ("seen": reconstruction of anatomy the model trains on)."""
    from mim_scale.data.stream import CropStream, manifest_shards
    from mim_scale.data.window import hu_window

    held_out = bool(cfg.data.validation_shards)
    # every held-out volume equally likely: a training mixture names training datasets, not the held-out ones
    data = dataclasses.replace(cfg.data, num_workers=0, **({"shards": cfg.data.validation_shards, "mixture": {}}
                                                           if held_out else {}))
    it = iter(CropStream(data, manifest_shards(data), seed=cfg.data.seed + STREAM_SEED_OFFSET))
    hu = torch.stack([next(it)["crop"] for _ in range(cfg.train.validation_crops)])  # int16 (N, 1, S, S, S)
    crops = hu_window(hu, data.hu_min, data.hu_max)  # the set is kept (and saved) as float32, on the CPU
    vset = validation_set_from_crops(crops, cfg, seed=cfg.train.seed)
    return dataclasses.replace(vset, source="held-out" if held_out else "seen")


def load_or_draw_validation_set(cfg: Config, run_dir: Path, rank: int) -> ValidationSet:
    """The run's validation set: loaded from its file when there is one, else drawn (rank 0 saves it)."""
    path = validation_set_path(cfg, run_dir)
    if path.is_file():
        vset = ValidationSet.load(path, cfg)
        if cfg.data.validation_shards and vset.source != "held-out":
            raise UserFacingError(f"{path}: drawn from the training shards, but data.validation_shards names held-out "
                                  "volumes: remove the file (or point train.validation_set elsewhere) to draw it anew")
        log.info("rank %d: validation set %s (%d crops, %s)", rank, path, len(vset), vset.source)
        return vset
    vset = draw_validation_set(cfg)
    if rank == 0:
        vset.save(path)
        log.info("validation set of %d crops drawn from the %s shards, saved to %s", len(vset), vset.source, path)
    return vset


def evaluate(model: torch.nn.Module, vset: ValidationSet) -> dict[str, float]:
    """``val_rec_l1`` .. ``val_total`` of ``model`` on ``vset``. Crops stay float32, as in training: the
    targets are cut from them and the model casts only the encoder's input."""
    return validation_losses(model, dataclasses.replace(vset, crops=vset.crops.float()))
