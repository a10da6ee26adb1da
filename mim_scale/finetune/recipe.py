"""The fine-tuning recipe: preprocessing, sampling, augmentation, optimisation and evaluation settings.

A recipe is a TOML file (or a shipped name such as ``btcv``, read from
``mim_scale/configs/finetune_<name>.toml``) loaded into frozen dataclasses and validated; every problem
raises :class:`~mim_scale.tomltree.ConfigError` (also importable from :mod:`mim_scale.config`) naming the dotted key.

Precedence, lowest first: the defaults below, the exported encoder's own preprocessing (its
``config.json``), the recipe file, then ``--set section.key=value`` overrides. So an exported model
fine-tunes with the intensity window and spacing it was pre-trained with unless the recipe says otherwise.

Usage::

    recipe = load_recipe("btcv", overrides=["train.steps=500"], preprocessing=meta["preprocessing"])
    recipe.preprocessing.spacing   # (2.0, 1.5, 1.5): BTCV's 1.5 x 1.5 x 2.0 mm along S, P, L

Orientation: pre-training arrays are (D, H, W) = (z, y, x) of the LPS frame, axis codes ``SPL``; the
shipped recipes reorient to ``SPL`` too (spacing and ROI given in that axis order), so the encoder sees
anatomy the way it was pre-trained. A recipe whose orientation differs from the encoder's gets a
warning: the encoder would see every volume transposed or mirrored.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mim_scale.tomltree import TreeSource, apply_overrides, build_dataclass, choice, require

log = logging.getLogger(__name__)

TASKS = ("segmentation", "classification")


@dataclass(frozen=True)
class PreprocessingRecipe:
    """Deterministic preprocessing, applied once per volume (cached)."""

    orientation: str = "SPL"  # axis codes the volume is reoriented to (SPL: as the pre-training arrays)
    spacing: tuple[float, ...] = (1.5, 1.5, 1.5)  # mm per voxel along the oriented axes
    hu_min: float = -1000.0  # intensity window, mapped linearly to [0, 1] and clipped
    hu_max: float = 1000.0
    roi_size: tuple[int, ...] = ()  # training crop / sliding-window ROI; () = the encoder's view size cubed
    crop_foreground: bool = True  # drop the air around the body (voxels at the window's floor) before caching

    def check(self) -> None:
        o = self.orientation
        require(len(o) == 3 and all(sum(c in pair for c in o) == 1 for pair in ("LR", "AP", "SI")),
                "preprocessing.orientation", f"must be three axis codes, one of each L/R, A/P, S/I, such as SPL or "
                f"RAS, got {o!r}")
        require(len(self.spacing) == 3 and all(s > 0 for s in self.spacing), "preprocessing.spacing",
                f"needs three positive values (mm), got {list(self.spacing)}")
        require(self.hu_max > self.hu_min, "preprocessing.hu_max", "must be greater than preprocessing.hu_min")
        require(self.roi_size == () or (len(self.roi_size) == 3 and all(s > 0 for s in self.roi_size)),
                "preprocessing.roi_size",
                f"needs three positive sizes, or [] for the encoder's view size, got {list(self.roi_size)}")


@dataclass(frozen=True)
class AugmentationRecipe:
    """Random transforms applied to each training crop."""

    pos_fraction: float = 0.5  # share of segmentation crops centred on a foreground voxel
    flip_prob: float = 0.1  # per axis
    rot90_prob: float = 0.1  # in the axial plane
    intensity_scale: float = 0.1  # multiply by 1 + U(-s, s)
    intensity_shift: float = 0.1  # add U(-s, s) (intensities are in [0, 1])
    intensity_prob: float = 0.5

    def check(self) -> None:
        require(0 <= self.pos_fraction <= 1, "augmentation.pos_fraction", "must be in [0, 1]")
        for key in ("flip_prob", "rot90_prob", "intensity_prob"):
            require(0 <= getattr(self, key) <= 1, f"augmentation.{key}", "must be a probability in [0, 1]")
        require(0 <= self.intensity_scale < 1, "augmentation.intensity_scale", "must be in [0, 1)")
        require(self.intensity_shift >= 0, "augmentation.intensity_shift", "must be >= 0")


@dataclass(frozen=True)
class TrainRecipe:
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 50
    weight_decay: float = 1e-5
    betas: tuple[float, ...] = (0.9, 0.999)
    layer_decay: float = 1.0  # layer-wise lr decay of the encoder; 1.0 disables it
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    balanced_sampling: bool = False  # classification: draw each class equally often
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only the final checkpoint
    keep_last: int = 2
    val_every: int = 0  # steps; 0 = validate only at the end
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; master weights stay fp32)

    def check(self) -> None:
        require(self.steps >= 1, "train.steps", "must be >= 1")
        require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        require(self.lr > 0, "train.lr", "must be > 0")
        require(0 <= self.min_lr <= self.lr, "train.min_lr", "must be between 0 and train.lr")
        require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
                "needs two values in [0, 1)")
        require(0 < self.layer_decay <= 1, "train.layer_decay", "must be in (0, 1] (1 disables layer-wise decay)")
        require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        for key, least in (("log_every", 1), ("checkpoint_every", 0), ("keep_last", 1), ("val_every", 0),
                           ("threads", 0)):
            require(getattr(self, key) >= least, f"train.{key}", f"must be >= {least}")
        d = self.device
        require(d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()),
                "train.device", f"must be auto, cpu, cuda or cuda:N, got {d!r}")
        require(self.precision in ("fp32", "bf16"), "train.precision", f"must be fp32 or bf16, got {self.precision!r}")


@dataclass(frozen=True)
class NetworkRecipe:
    feature_size: int = 0  # decoder width at full resolution; 0 = the encoder's first stage width
    norm: str = "instance"  # MONAI norm name for the decoder blocks
    dropout: float = 0.0  # classification head
    pooling: str = "avg"  # classification: "avg" or "max" global pooling

    def check(self) -> None:
        require(self.feature_size >= 0, "network.feature_size", "must be >= 0 (0 = the encoder's first width)")
        require(self.norm in ("instance", "batch"), "network.norm", f"must be instance or batch, got {self.norm!r}")
        require(0 <= self.dropout < 1, "network.dropout", "must be in [0, 1)")
        require(self.pooling in ("avg", "max"), "network.pooling", f"must be avg or max, got {self.pooling!r}")


@dataclass(frozen=True)
class EvalRecipe:
    sw_overlap: float = 0.5
    sw_batch_size: int = 2
    sw_mode: str = "gaussian"  # "gaussian" or "constant" blending

    def check(self) -> None:
        require(0 <= self.sw_overlap < 1, "eval.sw_overlap", "must be in [0, 1)")
        require(self.sw_batch_size >= 1, "eval.sw_batch_size", "must be >= 1")
        require(self.sw_mode in ("gaussian", "constant"), "eval.sw_mode",
                f"must be gaussian or constant, got {self.sw_mode!r}")


@dataclass(frozen=True)
class Recipe:
    task: str = "segmentation"
    # class name -> source label values merged into that class (segmentation); empty = the dataset's
    # own labels, used as they are. Useful for multi-organ label maps such as TotalSegmentator's.
    classes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    preprocessing: PreprocessingRecipe = field(default_factory=PreprocessingRecipe)
    augmentation: AugmentationRecipe = field(default_factory=AugmentationRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    network: NetworkRecipe = field(default_factory=NetworkRecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: list[str] | dict[str, Any]) -> "Recipe":
        return recipe_from_dict(apply_overrides(self.to_dict(), overrides))


def shipped_recipes() -> list[str]:
    names = []
    for entry in resources.files("mim_scale.configs").iterdir():
        if entry.name.startswith("finetune_") and entry.name.endswith(".toml"):
            names.append(entry.name[len("finetune_"):-len(".toml")])
    return sorted(names)


_TREES = TreeSource("recipe", shipped_file=lambda name: f"finetune_{name}.toml", names=shipped_recipes)


def read_recipe_tree(source: str | Path) -> dict[str, Any]:
    """The raw tree of a shipped recipe name or a TOML file (``extends = "NAME_OR_FILE"`` resolved)."""
    return _TREES.read(source)


def preprocessing_from_meta(meta_pre: dict[str, Any] | None) -> dict[str, Any]:
    """The recipe's preprocessing keys taken from an exported encoder's ``preprocessing`` block."""
    out: dict[str, Any] = {}
    if not meta_pre:
        return out
    if "orientation" in meta_pre:
        out["orientation"] = str(meta_pre["orientation"])
    spacing = meta_pre.get("spacing_mm", meta_pre.get("spacing"))  # export writes spacing_mm
    if spacing is not None:
        out["spacing"] = [float(spacing)] * 3 if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
    for key in ("hu_min", "hu_max"):
        if key in meta_pre:
            out[key] = float(meta_pre[key])
    return out


def load_recipe(
    source: str | Path | dict | None = None,
    overrides: list[str] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> Recipe:
    """Load a recipe: defaults < ``preprocessing`` (an exported model's) < ``source`` < ``overrides``."""
    tree: dict[str, Any] = {}
    from_model = preprocessing_from_meta(preprocessing)
    if from_model:
        tree["preprocessing"] = from_model
    if isinstance(source, dict):
        tree = _TREES.merge(tree, source)
    elif source:
        tree = _TREES.merge(tree, read_recipe_tree(source))
    recipe = recipe_from_dict(apply_overrides(tree, overrides or []))
    pretrained = from_model.get("orientation")
    if pretrained and recipe.preprocessing.orientation != pretrained:
        log.warning("recipe orientation %s differs from the encoder's pre-training orientation %s: the encoder "
                    "will see every volume transposed or mirrored (set preprocessing.orientation=%s, with spacing "
                    "and roi_size in that axis order)", recipe.preprocessing.orientation, pretrained, pretrained)
    return recipe


def recipe_from_dict(tree: dict[str, Any]) -> Recipe:
    recipe = build_dataclass(Recipe, tree, "")
    validate_recipe(recipe)
    return recipe


def validate_recipe(r: Recipe) -> None:
    """The task and class map here; every section's ranges in its own ``check``."""
    choice(r.task, "task", TASKS)
    seen: dict[int, str] = {}
    for name, values in r.classes.items():
        require(name != "background", f"classes.{name}", "class 0 is the background; do not list it")
        require(len(values) >= 1, f"classes.{name}", "needs at least one source label value")
        for v in values:
            require(v > 0, f"classes.{name}", f"source label values must be > 0, got {v}")
            require(v not in seen, f"classes.{name}", f"label value {v} is already mapped to {seen.get(v)!r}")
            seen[v] = name
    for section in (r.preprocessing, r.augmentation, r.train, r.network, r.eval):
        section.check()
