"""Encoder initialisation (an exported foundation checkpoint, or scratch) and network construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mim_scale.config import ConfigError, ModelConfig, load_config
from mim_scale.tomltree import build_dataclass
from mim_scale.errors import UserFacingError
from mim_scale.finetune.networks import ClassificationNet, SegmentationNet
from mim_scale.finetune.recipe import Recipe


@dataclass
class EncoderInit:
    """An encoder ready for fine-tuning and where it came from."""

    encoder: nn.Module
    model: ModelConfig
    source: str  # "scratch" or the checkpoint path
    meta: dict[str, Any]  # the exported config.json ({} for scratch)

    @property
    def pretrained(self) -> bool:
        return self.source != "scratch"


def model_config_from_meta(meta: dict[str, Any], where: str) -> ModelConfig:
    tree = meta.get("model")
    if not isinstance(tree, dict):
        raise UserFacingError(f"{where}: config.json has no 'model' block with the encoder's architecture")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return build_dataclass(ModelConfig, {k: v for k, v in tree.items() if k in names}, "model")
    except ConfigError as exc:
        raise UserFacingError(f"{where}: bad 'model' block in config.json: {exc}") from exc


def resolve_init(init: str, model_config: str | ModelConfig | None = None) -> EncoderInit:
    """``init`` = ``"scratch"`` (architecture from ``model_config``: a shipped name, a file, or a
    ModelConfig) or an exported encoder loaded with strict key matching: an export folder, an ``s3://``
    URI of one (pulled into the local cache), or a single safetensors file (its architecture from a
    ``config.json`` beside it, else ``model_config``). Exports are verified against ``SHA256SUMS`` first."""
    from mim_scale.model.encoder import build_encoder

    if init == "scratch":
        if model_config is None:
            raise UserFacingError("--init scratch needs --model (a shipped config name such as tiny or base, or a file)")
        cfg = model_config if isinstance(model_config, ModelConfig) else load_config(model_config).model
        return EncoderInit(build_encoder(cfg), cfg, "scratch", {})
    from mim_scale.export_store import is_remote
    from mim_scale.model.io import load_encoder
    if is_remote(init):
        # pulled into the local cache and every sha256 checked; the cached folder is what gets loaded
        encoder, meta = load_encoder(init)
        return EncoderInit(encoder, model_config_from_meta(meta, init), init, meta)
    path = Path(init)
    if not path.exists():
        raise UserFacingError(f"--init {init}: no such exported encoder (a folder, an s3:// URI or a .safetensors "
                              "file), and not 'scratch'")
    folder = path if path.is_dir() else path.parent
    if (folder / "config.json").is_file() or model_config is None:
        encoder, meta = load_encoder(path)  # every sha256 in SHA256SUMS checked before anything is read
        cfg = model_config_from_meta(meta, str(path))
    else:
        # a lone safetensors file: the architecture comes from --model
        cfg = model_config if isinstance(model_config, ModelConfig) else load_config(model_config).model
        encoder, meta = load_encoder(path, model_cfg=cfg)
    return EncoderInit(encoder, cfg, str(path.resolve()), meta)


def roi_for(recipe: Recipe, model: ModelConfig) -> tuple[int, int, int]:
    """The training crop / inference window, validated against the network's downsampling."""
    roi = tuple(recipe.preprocessing.roi_size) or (model.view_size,) * 3
    # segmentation adds one more stride-2 stage below the encoder's last one
    factor = model.patch_size * (2 if recipe.task == "segmentation" else 1)
    if any(s % factor for s in roi):
        raise ConfigError("preprocessing.roi_size",
                          f"{list(roi)} must be divisible by {factor} (the encoder's patch size {model.patch_size}"
                          + (" x 2 for the extra segmentation stage)" if factor != model.patch_size else ")"))
    return roi  # type: ignore[return-value]


def build_network(recipe: Recipe, init: EncoderInit, num_classes: int) -> nn.Module:
    n = recipe.network
    if recipe.task == "segmentation":
        return SegmentationNet(init.encoder, init.model.widths, out_channels=num_classes,
                               in_channels=init.model.in_channels, feature_size=n.feature_size, norm_name=n.norm)
    return ClassificationNet(init.encoder, init.model.widths, num_classes=num_classes,
                             pooling=n.pooling, dropout=n.dropout)
