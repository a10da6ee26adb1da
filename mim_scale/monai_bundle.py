"""MONAI bundles of the foundation encoder: ``mim-scale export RUN --format monai-bundle --out DIR``.

Layout (MONAI's bundle specification)::

    DIR/configs/metadata.json    network_data_format: (1, 1, p*n, p*n, p*n) in [0, 1] -> (1, E, n, n, n)
    DIR/configs/inference.json   builds ``network_def`` (:class:`FeatureEncoder`) and ``network`` (the same
                                 with the weights, loaded by the config itself through safetensors), and
                                 the preprocessing the encoder was trained with
    DIR/models/model.safetensors the weights: ``FeatureEncoder.state_dict()`` (``encoder.<key schema 1>``)
    DIR/docs/README.md           what it is, how to load it, licence
    DIR/SHA256SUMS               written last, as for every export

``RUN`` may also be a ``mim-scale finetune`` run folder: then ``network_def`` is the fine-tuned network
(:func:`FinetunedNetwork`: the segmentation or classification head on the encoder, as ``evaluate`` builds
it), ``models/model.safetensors`` its newest checkpoint's weights, and ``inferer`` the recipe's sliding
window; ``metadata.json`` names the classes and the ROI.

There is deliberately no ``models/model.pt``: MONAI's usual checkpoint is a pickle, which runs code when
loaded. MONAI's own tooling accepts the bundle::

    python -m monai.bundle verify_net_in_out network --meta_file DIR/configs/metadata.json \\
        --config_file DIR/configs/inference.json --bundle_root DIR

and ``ConfigParser`` builds the loaded network: ``load_bundle_network(DIR)`` below does exactly that.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mim_scale
from mim_scale import model_card

WEIGHTS = "models/model.safetensors"


def FinetunedNetwork(run: dict[str, Any]) -> nn.Module:  # noqa: N802 - a bundle `_target_`, named as a class
    """The fine-tuned network of a ``mim-scale finetune`` run (its ``run.json`` tree), untrained: the
    segmentation (or classification) head on the hybrid encoder, exactly as ``evaluate`` builds it."""
    from mim_scale.finetune.build import EncoderInit, build_network, model_config_from_meta
    from mim_scale.finetune.recipe import recipe_from_dict
    from mim_scale.model import build_encoder

    cfg = model_config_from_meta(run, "run.json")
    init = EncoderInit(build_encoder(cfg), cfg, str(run.get("init", "")), {})
    return build_network(recipe_from_dict(run["recipe"]), init, len(run["classes"]))


class FeatureEncoder(nn.Module):
    """The exported encoder as a MONAI bundle network: x (N, C, D, H, W), each divisible by the patch size,
    in [0, 1] -> the last stage's features (N, E, D/p, H/p, W/p); ``forward_features`` gives every stage."""

    def __init__(self, model: dict[str, Any]):
        super().__init__()
        from mim_scale.model.io import model_config_of
        from mim_scale.model import build_encoder

        self.encoder = build_encoder(model_config_of(dict(model)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x)[-1]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.forward_features(x)


def load_weights(network: nn.Module, path: str, device: str | torch.device = "cpu", strict: bool = True) -> nn.Module:
    """Load a safetensors state dict into ``network`` (strict keys and shapes); returns it on ``device``.

    Called from ``inference.json``, so the bundle's own config loads its weights, with no unpickling."""
    from safetensors.torch import load_file

    network.load_state_dict(load_file(path), strict=strict)
    return network.to(device)


def _metadata_head(changelog: str) -> dict[str, Any]:
    """The first keys of every bundle's ``metadata.json``: MONAI's schema, the bundle version and what built it."""
    import monai
    import numpy
    import safetensors

    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": changelog},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"mim-scale": mim_scale.__version__, "safetensors": safetensors.__version__},
    }


def _metadata(config: dict[str, Any]) -> dict[str, Any]:
    p, e = config["patch_size"], config["model"]["widths"][-1]
    data = config["training"].get("data") or {}
    licenses = data.get("licenses") or {}
    lic = model_card.weights_license(licenses) if licenses else "other"
    return {
        **_metadata_head(f"exported by mim-scale {config['software_version']} at step {config['training']['step']}"),
        "name": "MiM CT foundation encoder",
        "task": "Self-supervised 3D CT feature extraction (MiM, Mask in Mask pre-training)",
        "description": (f"Hybrid conv + transformer encoder, {config['parameters']:,} parameters, pre-trained by "
                        f"mim-scale for {config['training']['step']} steps on "
                        f"{config['training']['samples_seen']} crops. Output: the last stage's feature map."),
        "authors": "mim-scale",
        "copyright": f"Weights licence: {lic} (follows the training data's terms; see docs/README.md)",
        "data_source": ", ".join(f"{k} ({v} volumes)" for k, v in sorted((data.get("datasets") or {}).items()))
                       or "unknown",
        "data_type": "nibabel or dicom, resampled as configs/inference.json#preprocessing",
        "image_classes": "single-channel CT intensity, HU windowed and scaled to [0, 1]",
        "intended_use": "Research: initialisation for CT segmentation and classification. Not a medical device.",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": config["in_channels"],
                "spatial_shape": [f"{p}*n"] * 3, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "image", "format": "features", "num_channels": e, "spatial_shape": ["n"] * 3,
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {}}},
        },
        "mim_scale": {"preprocessing": config["preprocessing"], "platform": platform.platform()},
    }


def _inference(config: dict[str, Any]) -> dict[str, Any]:
    p = config["preprocessing"]
    spacing = p["spacing_mm"]
    spacing = list(spacing) if isinstance(spacing, (list, tuple)) else [spacing] * 3
    return {
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "mim_scale.monai_bundle.FeatureEncoder", "model": config["model"]},
        # the weights, loaded by this config itself (safetensors: no pickle runs)
        "network": {"_target_": "mim_scale.monai_bundle.load_weights", "network": "@network_def",
                    "path": f"$@bundle_root + '/{WEIGHTS}'", "device": "@device"},
        # the preprocessing the encoder was pre-trained with (the shards' SPL array order of the LPS frame)
        "preprocessing": _preprocessing(p["orientation"], spacing, p["hu_min"], p["hu_max"]),
    }


def _preprocessing(orientation: str, spacing: list[float], hu_min: float, hu_max: float) -> dict[str, Any]:
    """MONAI transforms as fine-tuning's deterministic part applies them (mim_scale.finetune.data)."""
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": False},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": orientation,
             "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
            {"_target_": "Spacingd", "keys": "image", "pixdim": spacing, "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": hu_min, "a_max": hu_max,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
        ],
    }


def _readme(config: dict[str, Any]) -> str:
    data = config["training"].get("data") or {}
    licenses = data.get("licenses") or {}
    lic = model_card.weights_license(licenses) if licenses else "other"
    rows = "\n".join(f"| {k} | {v['license']} |" for k, v in sorted(licenses.items())) or "| (not recorded) | unknown |"
    p = config["patch_size"]
    return f"""# MiM CT foundation encoder (MONAI bundle)

Exported by mim-scale {config['software_version']}: {config['parameters']:,} parameters, step
{config['training']['step']}, {config['training']['samples_seen']} crops seen.

## Load
```python
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config("configs/inference.json"); parser.read_meta("configs/metadata.json")
parser["bundle_root"] = "THIS_FOLDER"
net = parser.get_parsed_content("network")      # weights from {WEIGHTS} (safetensors, no pickle)
features = net(x)                               # x: (N, 1, {p}*n, {p}*n, {p}*n) in [0, 1] -> (N, E, n, n, n)
```
Check it: `python -m monai.bundle verify_net_in_out network --meta_file configs/metadata.json
--config_file configs/inference.json --bundle_root THIS_FOLDER`; files: `sha256sum -c SHA256SUMS`.
It needs `pip install mim-scale` (the network's code). There is no `models/model.pt` on purpose: a pickle
runs code when loaded.

## Preprocessing
`configs/inference.json#preprocessing`: orientation {config['preprocessing']['orientation']} (LPS labels),
spacing {config['preprocessing']['spacing_mm']} mm, HU [{config['preprocessing']['hu_min']},
{config['preprocessing']['hu_max']}] scaled to [0, 1].

## Licence
Weights: `{lic}`, following the training data's terms:

| data set | licence |
| --- | --- |
{rows}

Research use; not a medical device.
"""


def write_bundle(folder: Path, weights: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write the bundle into ``folder`` (empty; the caller writes SHA256SUMS and publishes it).

    ``weights``: the encoder's state dict (key schema 1, unprefixed); ``config``: the export's config.json.
    """
    from safetensors.torch import save_file

    for sub in ("configs", "models", "docs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    meta = {"format": "mim-scale-monai-bundle", "schema_version": str(config["schema_version"]),
            "version": mim_scale.__version__}
    save_file({f"encoder.{k}": v for k, v in weights.items()}, str(folder / WEIGHTS), metadata=meta)
    (folder / "configs" / "metadata.json").write_text(json.dumps(_metadata(config), indent=1))
    (folder / "configs" / "inference.json").write_text(json.dumps(_inference(config), indent=1))
    (folder / "docs" / "README.md").write_text(_readme(config))
    (folder / "configs" / "mim_scale_export.json").write_text(json.dumps(config, indent=1))


def is_finetune_run(run: Path) -> bool:
    return (Path(run) / "run.json").is_file() and (Path(run) / "checkpoints").is_dir()


def write_finetuned_bundle(folder: Path, run_dir: Path) -> dict[str, Any]:
    """A bundle of a fine-tuned network (``mim-scale finetune`` run folder: ``run.json`` + its newest
    checkpoint's ``model.safetensors``). Returns the run's summary for the caller's messages."""
    from safetensors.torch import load_file, save_file

    from mim_scale.errors import UserFacingError
    from mim_scale.finetune.checkpoint import latest_checkpoint, read_json

    run = read_json(run_dir / "run.json")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserFacingError(f"{run_dir}: no complete fine-tuning checkpoint (checkpoints/step_*/state.json)")
    weights = load_file(str(ckpt / "model.safetensors"))
    net = FinetunedNetwork(run)
    load_weights(net, str(ckpt / "model.safetensors"))  # strict: the bundle's network is the run's network
    state = read_json(ckpt / "state.json")
    for sub in ("configs", "models", "docs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / WEIGHTS),
              metadata={"format": "mim-scale-finetuned", "version": mim_scale.__version__})
    rec, classes, roi = run["recipe"], list(run["classes"]), [int(r) for r in run["roi_size"]]
    pre = rec["preprocessing"]
    seg = rec["task"] == "segmentation"
    meta = {
        **_metadata_head(f"exported by mim-scale {mim_scale.__version__} from {run_dir.name}, step {state.get('step')}"),
        "name": f"MiM fine-tuned CT {rec['task']}",
        "task": f"CT {rec['task']} ({', '.join(classes)})",
        "description": f"mim-scale fine-tuned network (init {run.get('init')}), step {state.get('step')}.",
        "authors": "mim-scale",
        "copyright": "Follows the terms of the pre-training and fine-tuning data; see docs/README.md",
        "data_source": str(run.get("data", "unknown")),
        "data_type": "nibabel or dicom, resampled as configs/inference.json#preprocessing",
        "image_classes": "single-channel CT intensity, HU windowed and scaled to [0, 1]",
        "label_classes": {str(i): c for i, c in enumerate(classes)},
        "intended_use": "Research only. Not a medical device.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image" if seg else "probabilities", "format": "segmentation" if seg else "classes",
                                 "num_channels": len(classes), "spatial_shape": roi if seg else [], "dtype": "float32",
                                 "value_range": [], "is_patch_data": True,
                                 "channel_def": {str(i): c for i, c in enumerate(classes)}}},
        },
    }
    inference = {
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "mim_scale.monai_bundle.FinetunedNetwork", "run": run},
        "network": {"_target_": "mim_scale.monai_bundle.load_weights", "network": "@network_def",
                    "path": f"$@bundle_root + '/{WEIGHTS}'", "device": "@device"},
        "preprocessing": _preprocessing(pre["orientation"], list(pre["spacing"]), pre["hu_min"], pre["hu_max"]),
    }
    if seg:
        inference["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": roi,
                                "sw_batch_size": int((rec.get("eval") or {}).get("sw_batch_size", 4)),
                                "overlap": float((rec.get("eval") or {}).get("sw_overlap", 0.5))}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta, indent=1))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    (folder / "configs" / "mim_scale_run.json").write_text(json.dumps(run, indent=1))
    (folder / "docs" / "README.md").write_text(f"""# MiM fine-tuned CT {rec['task']} network (MONAI bundle)

Exported by mim-scale {mim_scale.__version__} from the fine-tuning run `{run_dir.name}` (step {state.get('step')},
init `{run.get('init')}`). Classes (output channels): {', '.join(classes)}.

## Load
```python
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config("configs/inference.json"); parser.read_meta("configs/metadata.json")
parser["bundle_root"] = "THIS_FOLDER"
net = parser.get_parsed_content("network")      # weights from {WEIGHTS} (safetensors, no pickle)
logits = parser.get_parsed_content("inferer")(x, net) if "inferer" in parser else net(x)
```
Input: {roi} crops in [0, 1] after `configs/inference.json#preprocessing` (orientation
{pre['orientation']} with LPS labels, spacing {list(pre['spacing'])} mm, HU [{pre['hu_min']}, {pre['hu_max']}]).
Check it: `python -m monai.bundle verify_net_in_out network --meta_file configs/metadata.json
--config_file configs/inference.json --bundle_root THIS_FOLDER`; files: `sha256sum -c SHA256SUMS`.

## Licence
The weights follow the terms of the pre-training data (see the encoder's card) and of the fine-tuning
data (`{run.get('data', 'unknown')}`). Research use; not a medical device.
""")
    return {"step": state.get("step"), "task": rec["task"], "classes": classes}


def load_bundle_network(bundle: str | Path, net_id: str = "network"):
    """Verify the bundle's ``SHA256SUMS``, then build ``net_id`` through MONAI's ``ConfigParser``:
    ``(network in eval mode, parser)``. ``bundle`` may be an ``s3://`` URI (pulled into the cache)."""
    from monai.bundle import ConfigParser

    from mim_scale.export_store import verified_folder

    folder = verified_folder(bundle)
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser.read_meta(str(folder / "configs" / "metadata.json"))
    parser["bundle_root"] = str(folder)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content(net_id)
    return net.eval(), parser
