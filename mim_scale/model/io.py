"""Reading (and the schema of) exported encoders: the loading API fine-tuning, the engine's ``--init`` and
users call, below the engine; :mod:`mim_scale.export` writes what this module reads.

An export folder holds ``encoder.safetensors`` (the keys of :class:`~mim_scale.model.HybridEncoder`'s
``state_dict()``, unprefixed: key schema :data:`SCHEMA_VERSION`, also in the safetensors metadata and in
``config.json``), ``config.json`` (the ``model`` config block, preprocessing, training summary) and
``SHA256SUMS`` (see :mod:`mim_scale.export_store`). Later schema versions keep loading version-1 files:
:func:`load_encoder` maps old keys forward before the strict check.

Loading never unpickles: ``load_encoder(DIR, s3:// URI or FILE)`` reads safetensors and JSON only, and only
after every file ``SHA256SUMS`` lists matched its sha256 (a remote export is pulled into the local cache
first). A lone ``.safetensors`` file outside any export folder has no index and loads unchecked.

Usage::

    encoder, config = load_encoder("exports/base")          # HybridEncoder, config.json + load report
    load_encoder_weights(model.encoder, "exports/base")      # into an encoder you built
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mim_scale.config import Config, ModelConfig, from_dict
from mim_scale.errors import UserFacingError
from mim_scale.export_store import (MAX_JSON_BYTES, SUMS_FILE, ExportIntegrityError, is_remote, parse_sums,
                                    verified_folder, verify_folder)
from mim_scale.fileutil import JSONFileError, read_json_bounded
from mim_scale.model.encoder import KEY_SCHEMA_VERSION

SCHEMA_VERSION = KEY_SCHEMA_VERSION  # the encoder owns its key names, so it owns their version
ENCODER_FILE = "encoder.safetensors"
FULL_FILE = "mim_full.safetensors"
CONFIG_FILE = "config.json"
ENCODER_PREFIX = "encoder."  # the encoder's keys inside the full pre-training model's state dict
ARCHITECTURE = "mim-hybrid-encoder"
SCALING = "clip HU to [hu_min, hu_max], then (hu - hu_min) / (hu_max - hu_min) -> [0, 1]"


def encoder_file_metadata(version: str, fmt: str = "mim-scale-encoder") -> dict[str, str]:
    """The safetensors metadata an export's weights carry (``version``: the writing mim-scale's)."""
    return {"format": fmt, "schema_version": str(SCHEMA_VERSION), "version": version}


def preprocessing_block(cfg: Config, orientation: str, spacing_mm: Any, axis_order: str | None = None) -> dict[str, Any]:
    """``config.json["preprocessing"]``: what fine-tuning reads to prepare volumes as the encoder saw them."""
    block: dict[str, Any] = {"orientation": orientation}
    if axis_order is not None:
        block["axis_order"] = axis_order
    block.update({"spacing_mm": spacing_mm, "hu_min": cfg.data.hu_min, "hu_max": cfg.data.hu_max, "scaling": SCALING,
                  "pretraining_crop": cfg.data.crop_size, "pretraining_view": cfg.model.view_size})
    return block


def encoder_config(cfg: Config, *, version: str, parameters: int, dtype: str, preprocessing: dict[str, Any],
                   training: dict[str, Any], library_name: str | None = None) -> dict[str, Any]:
    """An export's ``config.json`` (what :func:`load_encoder` and fine-tuning read): schema, architecture (the
    ``model`` config block), sizes, preprocessing, training summary; ``version``: the writing mim-scale's."""
    config: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "architecture": ARCHITECTURE}
    if library_name is not None:
        config["library_name"] = library_name
    config.update({
        "software_version": version,
        "model": cfg.to_dict()["model"],
        "patch_size": cfg.model.patch_size,
        "input_size": [cfg.model.view_size] * 3,
        "in_channels": cfg.model.in_channels,
        "parameters": parameters,
        "dtype": dtype,
        "preprocessing": preprocessing,
        "training": training,
    })
    return config


class KeyMismatchError(UserFacingError):
    def __init__(self, path: Path, missing: list[str], unexpected: list[str]):
        self.missing, self.unexpected = missing, unexpected
        super().__init__(f"{path}: encoder keys do not match (missing {len(missing)}: {missing[:8]}, "
                         f"unexpected {len(unexpected)}: {unexpected[:8]})")


def locate_export(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """The weights file of an export, verified, and its config.json (None for a lone safetensors file).

    ``path``: an export folder (a Hub download too), an ``s3://`` URI (pulled into the cache), or a
    ``.safetensors`` file. Every file the folder's ``SHA256SUMS`` lists is checked before anything is read;
    a folder without ``SHA256SUMS`` is refused (partial or not an export); a file inside a folder that
    has one must be listed in it. Only a lone file with no index beside it loads unchecked.
    """
    if is_remote(path):
        folder, file = verified_folder(str(path)), None  # pulled, and checked, in the cache
        sums = parse_sums((folder / SUMS_FILE).read_bytes(), str(folder / SUMS_FILE))
    else:
        path = Path(path)
        if path.is_dir():
            folder, file = path, None
            sums = verify_folder(folder)
        elif path.is_file():
            folder, file = path.parent, path
            if not (folder / SUMS_FILE).is_file():
                return file, None  # a lone weights file: nothing to check it against
            sums = verify_folder(folder)
            if path.name not in sums:
                raise ExportIntegrityError(f"{path}: not listed in {folder / SUMS_FILE}")
        else:
            raise UserFacingError(f"{path}: no such export (a folder, an s3:// URI or a .safetensors file)")
    file = file or folder / ENCODER_FILE
    if file.name not in sums:
        raise UserFacingError(f"{folder}: no {ENCODER_FILE} in {SUMS_FILE} (expected an export folder or a "
                              ".safetensors file; a MONAI bundle loads through monai.bundle)")
    config = None
    if CONFIG_FILE in sums:
        config = _read_config(folder / CONFIG_FILE)
    elif (folder / CONFIG_FILE).is_file():
        raise ExportIntegrityError(f"{folder / CONFIG_FILE}: not listed in {SUMS_FILE}")
    return file, config


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = read_json_bounded(path, MAX_JSON_BYTES, "not an export's config")
    except JSONFileError as exc:
        raise ExportIntegrityError(f"{path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ExportIntegrityError(f"{path}: not a JSON object")
    return config


def _read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(file)), meta
    except Exception as exc:  # noqa: BLE001
        raise UserFacingError(f"{file}: not a readable safetensors file ({exc})") from exc


def _upgrade_keys(weights: dict[str, torch.Tensor], schema: int) -> dict[str, torch.Tensor]:
    """Map keys of an older schema to the current one (version 1 is current: nothing to map yet)."""
    if schema > SCHEMA_VERSION:
        raise UserFacingError(f"encoder key schema {schema} is newer than this mim-scale understands ({SCHEMA_VERSION})")
    return weights


def load_encoder_weights(encoder: torch.nn.Module, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Load exported weights (folder, ``s3://`` URI or file; verified) into an existing encoder.

    Returns {"missing": [...], "unexpected": [...]} (both empty under ``strict``, which raises instead)."""
    file, _config = locate_export(path)
    return _load_into(encoder, file, strict)


def _load_into(encoder: torch.nn.Module, file: Path, strict: bool) -> dict[str, list[str]]:
    weights, meta = _read_weights(file)
    weights = _upgrade_keys(weights, int(meta.get("schema_version", SCHEMA_VERSION)))
    own = encoder.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if strict and (missing or unexpected):
        raise KeyMismatchError(file, missing, unexpected)
    for key, value in weights.items():
        if key in own and own[key].shape != value.shape:
            raise UserFacingError(f"{file}: {key} has shape {tuple(value.shape)}, the encoder wants {tuple(own[key].shape)}")
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def model_config_of(model: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of an export's ``config.json["model"]`` block."""
    return from_dict({"model": model, "data": {"crop_size": 2 * model["view_size"]}}).model


def load_encoder(path: str | Path, strict: bool = True, model_cfg: ModelConfig | None = None):
    """Build the encoder described by an export and load its weights: ``(encoder, config_dict)``.

    ``path``: an export folder (config.json + encoder.safetensors; a folder downloaded from the Hugging
    Face Hub is one), an ``s3://bucket/prefix/NAME`` URI (pulled into the local cache), or a single
    safetensors file (then ``model_cfg`` must describe the architecture, unless the file sits in an export
    folder). Every file listed in ``SHA256SUMS`` is verified before anything is read.
    ``config_dict["local_path"]`` is the verified local folder the weights were read from.
    """
    from mim_scale.model.encoder import build_encoder

    file, config = locate_export(path)
    config = dict(config or {})
    if model_cfg is None:
        if "model" not in config:
            raise UserFacingError(f"{path}: no {CONFIG_FILE} beside the weights; pass model_cfg= to describe the encoder")
        model_cfg = model_config_of(config["model"])
    encoder = build_encoder(model_cfg)
    config["load_report"] = _load_into(encoder, file, strict)
    config["local_path"] = str(file.parent)
    return encoder, config
