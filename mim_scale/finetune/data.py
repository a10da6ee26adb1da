"""Fine-tuning data: the dataset list, MONAI preprocessing, and cached volumes.

Dataset formats:

- **Decathlon-style JSON** (segmentation or classification)::

      {"labels": {"0": "background", "1": "liver"},           # optional
       "training":   [{"image": "imgs/a.nii.gz", "label": "labels/a.nii.gz"}, ...],
       "validation": [{"image": "imgs/b.nii.gz", "label": "labels/b.nii.gz"}, ...]}

  Relative paths are resolved against the JSON file's folder (as MONAI's ``load_decathlon_datalist``
  does). For classification, ``label`` is an integer class index instead of a file.
- **CSV** (classification): a header ``image,label[,split]``; ``split`` is ``training`` (default) or
  ``validation``; image paths are relative to the CSV's folder.

Every problem (missing file, missing key, label out of range) raises :class:`UserFacingError` naming
the dataset file and the entry at fault.

Preprocessing is split in two: the deterministic part (load, reorient, resample, HU window, foreground
indices) runs once per volume and is cached in memory; the random part (crop, flips, intensity jitter)
runs per training sample with a random state seeded from (seed, step), so a resumed run draws exactly
the samples the uninterrupted run would have drawn.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt

from mim_scale.errors import UserFacingError
from mim_scale.finetune.recipe import Recipe


@dataclass
class DatasetSpec:
    """A parsed dataset list. Items are dicts with absolute ``image`` and ``label`` entries."""

    source: Path
    training: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    labels: dict[int, str] = field(default_factory=dict)  # from the JSON's "labels" block, if any


def read_dataset(path: str | Path, task: str) -> DatasetSpec:
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"dataset file not found: {path}")
    if path.suffix.lower() == ".csv":
        if task != "classification":
            raise UserFacingError(f"{path}: a CSV dataset is for classification; segmentation needs a "
                                  "Decathlon-style JSON with image/label NIfTI pairs")
        return _read_csv(path)
    return _read_decathlon(path, task)


def _read_decathlon(path: Path, task: str) -> DatasetSpec:
    try:
        tree = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserFacingError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(tree, dict):
        raise UserFacingError(f"{path}: must hold an object with 'training' and 'validation' lists")
    labels: dict[int, str] = {}
    raw_labels = tree.get("labels", {})
    if not isinstance(raw_labels, dict):
        raise UserFacingError(f"{path}: 'labels' must map label values to names")
    for k, v in raw_labels.items():
        try:
            labels[int(k)] = str(v)
        except ValueError as exc:
            raise UserFacingError(f"{path}: label key {k!r} in 'labels' is not an integer") from exc
    lists = {}
    for key in ("training", "validation"):
        entries = tree.get(key)
        if not isinstance(entries, list) or not entries:
            raise UserFacingError(f"{path}: needs a non-empty {key!r} list of entries")
        lists[key] = [_resolve_entry(path, key, i, e, task) for i, e in enumerate(entries)]
    return DatasetSpec(path, lists["training"], lists["validation"], labels)


def _resolve_entry(path: Path, key: str, index: int, entry: Any, task: str) -> dict[str, Any]:
    where = f"{path}: {key}[{index}]"
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise UserFacingError(f"{where}: each entry needs 'image' and 'label'")
    out = dict(entry)
    out["image"] = _existing(path.parent, entry["image"], f"{where} image")
    if task == "segmentation":
        out["label"] = _existing(path.parent, entry["label"], f"{where} label")
    else:
        out["label"] = _class_index(entry["label"], where)
    return out


def _existing(base: Path, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserFacingError(f"{where}: must be a file path, got {value!r}")
    p = Path(value)
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise UserFacingError(f"{where}: file not found: {p}")
    return str(p)


def _class_index(value: Any, where: str) -> int:
    try:
        idx = int(value)
    except (TypeError, ValueError) as exc:
        raise UserFacingError(f"{where}: classification label must be an integer class index, got {value!r}") from exc
    if idx < 0 or str(idx) != str(value).strip():
        raise UserFacingError(f"{where}: classification label must be an integer >= 0, got {value!r}")
    return idx


def _read_csv(path: Path) -> DatasetSpec:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise UserFacingError(f"{path}: needs a header with 'image' and 'label' columns (and optional 'split')")
        rows = list(reader)
    lists: dict[str, list] = {"training": [], "validation": []}
    for i, row in enumerate(rows, start=2):
        where = f"{path}: line {i}"
        split = (row.get("split") or "training").strip()
        if split not in lists:
            raise UserFacingError(f"{where}: split must be 'training' or 'validation', got {split!r}")
        lists[split].append({"image": _existing(path.parent, row["image"], f"{where} image"),
                             "label": _class_index(row["label"], where)})
    for key, entries in lists.items():
        if not entries:
            raise UserFacingError(f"{path}: no rows with split {key!r}")
    return DatasetSpec(path, lists["training"], lists["validation"])


def class_names(recipe: Recipe, spec: DatasetSpec) -> list[str]:
    """Output class names, index = network output channel (segmentation: background first)."""
    if recipe.task == "segmentation":
        if recipe.classes:
            return ["background", *recipe.classes]
        if spec.labels:
            top = max(spec.labels)
            return [spec.labels.get(i, "background" if i == 0 else f"class_{i}") for i in range(top + 1)]
        raise UserFacingError(f"{spec.source}: no 'labels' block in the dataset and no [classes] in the recipe: "
                              "cannot tell how many classes to segment")
    seen = {e["label"] for e in spec.training + spec.validation}
    names = {i: spec.labels.get(i, f"class_{i}") for i in range(max(seen) + 1)}
    if len(names) < 2:
        raise UserFacingError(f"{spec.source}: classification needs at least 2 classes, found {sorted(seen)}")
    return [names[i] for i in range(len(names))]


def label_mapping(recipe: Recipe) -> tuple[list[int], list[int]]:
    """(source values, target class indices) for MONAI's MapLabelValue; empty = labels used as they are."""
    orig, target = [], []
    for index, values in enumerate(recipe.classes.values(), start=1):
        for v in values:
            orig.append(v)
            target.append(index)
    return orig, target


def deterministic_transforms(recipe: Recipe, roi: tuple[int, int, int], with_label: bool) -> mt.Compose:
    """Load -> channel first -> orientation -> spacing -> HU window to [0, 1] (-> label remap, fg/bg indices).

    Output: ``image`` (1, X, Y, Z) float32 in [0, 1] on the recipe grid; for segmentation also ``label``
    (1, X, Y, Z) with class indices, and cached foreground/background indices for crop sampling.
    """
    p = recipe.preprocessing
    seg = recipe.task == "segmentation" and with_label
    keys = ["image", "label"] if seg else ["image"]
    steps: list = [
        mt.LoadImaged(keys=keys, image_only=False),
        mt.EnsureChannelFirstd(keys=keys),
        mt.Orientationd(keys=keys, axcodes=p.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(keys=keys, pixdim=p.spacing, mode=("bilinear", "nearest")[: len(keys)]),
        mt.ScaleIntensityRanged(keys=["image"], a_min=p.hu_min, a_max=p.hu_max, b_min=0.0, b_max=1.0, clip=True),
    ]
    if p.crop_foreground and seg:
        # the bounding box of everything above the window's floor: the body, usually 30-50% of the scan
        steps.append(mt.CropForegroundd(keys=keys, source_key="image", select_fn=_above_floor, allow_smaller=True))
    if seg:
        orig, target = label_mapping(recipe)
        if orig:
            # unlisted source values must become background: map everything, listed values win
            steps.append(_KeepListedLabels(keys="label", keep=orig))
            steps.append(mt.MapLabelValued(keys="label", orig_labels=orig, target_labels=target, dtype=np.uint8))
        steps.append(mt.SpatialPadd(keys=keys, spatial_size=roi, mode="constant"))
        steps.append(mt.FgBgToIndicesd(keys="label"))
        steps.append(_CompactCache(keys="label"))
    else:
        steps.append(mt.ResizeWithPadOrCropd(keys=["image"], spatial_size=roi, mode="constant"))
    steps.append(mt.EnsureTyped(keys=["image"], dtype=torch.float32, track_meta=False))
    return mt.Compose(steps)


def _above_floor(x):
    return x > 0


class _CompactCache(mt.MapTransform):
    """Shrink what stays cached per volume: labels as uint8, crop-sampling indices as int32.

    The indices cover every voxel (foreground + background), so at int64 they would take twice the
    memory of the float32 image; int32 indexes volumes up to 2**31 voxels.
    """

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lab = torch.as_tensor(np.asarray(d[key])).round()
            if lab.max() > 255:
                raise ValueError(f"label value {int(lab.max())} does not fit uint8; map it with the recipe's [classes]")
            d[key] = lab.to(torch.uint8)
            for post in ("_fg_indices", "_bg_indices"):
                idx = torch.as_tensor(np.asarray(d[key + post]))
                d[key + post] = idx.to(torch.int32).numpy()
        return d


class _KeepListedLabels(mt.MapTransform):
    """Set every label value not in ``keep`` to 0 (MapLabelValue leaves unlisted values untouched)."""

    def __init__(self, keys: str, keep: list[int]):
        super().__init__(keys)
        self.keep = np.asarray(sorted(set(keep)))

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            arr = lab.numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab)
            mask = np.isin(np.rint(arr).astype(np.int64), self.keep)
            out = np.where(mask, arr, 0)
            d[key] = type(lab)(out) if isinstance(lab, torch.Tensor) else out
        return d


def axial_axes(recipe: Recipe) -> tuple[int, int]:
    """The two array axes of the axial plane under the recipe's orientation: (0, 1) for RAS, (1, 2) for SPL
    (the recipe validator guarantees exactly one S/I code)."""
    i, j = (i for i, code in enumerate(recipe.preprocessing.orientation) if code not in "SI")
    return i, j


def random_transforms(recipe: Recipe, roi: tuple[int, int, int]) -> mt.Compose:
    """Per-sample training augmentation; segmentation crops ``roi`` by foreground/background sampling."""
    a = recipe.augmentation
    seg = recipe.task == "segmentation"
    keys = ["image", "label"] if seg else ["image"]
    steps: list = []
    if seg:
        pos = a.pos_fraction
        steps.append(mt.RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi, pos=pos, neg=1.0 - pos, num_samples=1,
            fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices", allow_smaller=False))
    for axis in range(3):
        steps.append(mt.RandFlipd(keys=keys, prob=a.flip_prob, spatial_axis=axis))
    # quarter turns in the axial plane (the SwinUNETR recipe's), wherever the orientation puts it
    steps.append(mt.RandRotate90d(keys=keys, prob=a.rot90_prob, max_k=3, spatial_axes=axial_axes(recipe)))
    if a.intensity_scale > 0:
        steps.append(mt.RandScaleIntensityd(keys="image", factors=a.intensity_scale, prob=a.intensity_prob))
    if a.intensity_shift > 0:
        steps.append(mt.RandShiftIntensityd(keys="image", offsets=a.intensity_shift, prob=a.intensity_prob))
    return mt.Compose(steps)


def load_cached(items: list[dict[str, Any]], transform: mt.Compose, source: Path) -> list[dict[str, Any]]:
    """Apply the deterministic transforms to every item once; errors name the file that failed."""
    out = []
    for item in items:
        try:
            out.append(transform(dict(item)))
        except Exception as exc:  # noqa: BLE001 - MONAI wraps reader errors; re-raise naming the input
            raise UserFacingError(f"{source}: cannot load {item['image']}"
                                  + (f" / {item['label']}" if isinstance(item.get("label"), str) else "")
                                  + f": {_root_cause(exc)}") from exc
    return out


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


class TrainSampler:
    """Draws training batches from cached volumes, reproducibly from (seed, step).

    ``batch(step)`` returns ``image`` (B, 1, *roi) float32 and ``label``: (B, 1, *roi) class indices
    (segmentation) or (B,) int64 (classification).
    """

    def __init__(self, cached: list[dict[str, Any]], recipe: Recipe, roi: tuple[int, int, int]):
        if not cached:
            raise ValueError("TrainSampler needs at least one cached volume")
        self.cached = cached
        self.recipe = recipe
        self.seg = recipe.task == "segmentation"
        self.transform = random_transforms(recipe, roi)
        self.by_class: list[np.ndarray] = []
        if not self.seg and recipe.train.balanced_sampling:
            labels = np.array([int(c["label"]) for c in cached])
            self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]

    def batch(self, step: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """The step's global batch of ``batch_size`` samples, or this rank's share of it.

        Each sample has its own seed drawn from (seed, step), so rank ``r`` of ``world`` workers takes
        samples ``r, r + world, ...`` and the workers together see exactly the single-process batch.
        """
        size = self.recipe.train.batch_size
        rng = np.random.default_rng([self.recipe.train.seed, step])
        if self.by_class:
            classes = rng.integers(0, len(self.by_class), size=size)
            picks = [int(self.by_class[c][rng.integers(0, len(self.by_class[c]))]) for c in classes]
        else:
            picks = [int(i) for i in rng.integers(0, len(self.cached), size=size)]
        seeds = rng.integers(0, 2**31 - 1, size=size)
        images, labels = [], []
        for i in range(rank, size, world):
            self.transform.set_random_state(seed=int(seeds[i]))
            sample = self.transform(self.cached[picks[i]])
            if isinstance(sample, list):  # RandCropByPosNegLabeld returns a list of num_samples crops
                sample = sample[0]
            images.append(torch.as_tensor(sample["image"], dtype=torch.float32))
            if self.seg:
                labels.append(torch.as_tensor(sample["label"]).round().to(torch.int64))
            else:
                labels.append(torch.as_tensor(int(sample["label"])))
        return {"image": torch.stack(images), "label": torch.stack(labels)}
