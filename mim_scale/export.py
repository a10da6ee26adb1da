"""Foundation checkpoints: a ZeRO training checkpoint -> a consolidated encoder anyone can load.

    mim-scale export runs/quickstart --out exports/quickstart            # the run's latest checkpoint
    mim-scale export runs/quickstart/checkpoint_000001 --out exports/q1  # one checkpoint

The export folder holds:

- ``encoder.safetensors``: the hybrid encoder's weights (float32 by default), key schema version 1 below;
- ``config.json``: architecture (the ``model`` config section), patch and input size, preprocessing
  (orientation, spacing, HU window, scaling), training summary;
- ``README.md``: the model card; ``SHA256SUMS``: sha256 of every file;
- with ``--full``, ``mim_full.safetensors``: every pre-training parameter (decoder, alignment MLPs too).

Key schema, version 1 (``schema_version`` in config.json and in the safetensors metadata): the keys of
``mim_scale.model.HybridEncoder.state_dict()``, unprefixed. Later versions keep loading version-1 files:
:func:`load_encoder` maps old keys forward before the strict check.

Loading never unpickles: ``load_encoder(DIR or FILE)`` reads safetensors and JSON only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import mim_scale
from mim_scale.config import ModelConfig, from_dict
from mim_scale.errors import UserFacingError
from mim_scale.fileutil import sha256_file

SCHEMA_VERSION = 1
ENCODER_FILE = "encoder.safetensors"
FULL_FILE = "mim_full.safetensors"
CONFIG_FILE = "config.json"
ENCODER_PREFIX = "encoder."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shard_summary(shards: str) -> dict[str, Any]:
    """Data summary and preprocessing from the shard manifest, where it can be read."""
    if not shards:
        return {}
    try:
        from mim_scale.shards.format import read_manifest

        manifest = read_manifest(shards)
    except Exception:  # noqa: BLE001 - the export still works without the manifest (e.g. remote shards)
        return {}
    build = manifest.get("build_config", manifest.get("build", {})) or {}
    datasets: dict[str, int] = {}
    for entry in manifest.get("shards", []):
        for name, n in (entry.get("datasets") or {}).items():
            datasets[name] = datasets.get(name, 0) + int(n)
    return {"datasets": datasets, "spacing_mm": build.get("spacing", manifest.get("spacing_mm")),
            "shards": len(manifest.get("shards", [])), "samples": sum(datasets.values())}


def export_run(run: Path, out: Path, *, dtype: str = "float32", full_state: bool = False) -> Path:
    """Consolidate the latest checkpoint under ``run`` (any ZeRO stage, any worker count) into ``out``."""
    from safetensors.torch import save_file

    from mim_scale.engine import checkpoint as ckpt

    from mim_scale.launcher.runs import committed_checkpoint

    # a Ray run: the newest checkpoint Ray committed (a crash mid-upload leaves a partial folder that only
    # Ray's own list tells apart); a checkpoint folder or a local run: the newest complete one
    committed = None if (Path(run) / ckpt.STATE_FILE).is_file() else committed_checkpoint(str(run))
    try:
        ckpt_dir = Path(committed) if committed else ckpt.latest_checkpoint(Path(run))
    except FileNotFoundError as exc:
        raise UserFacingError(str(exc)) from exc
    state = ckpt.TrainState.read(ckpt_dir)
    cfg = from_dict(state.config)
    full = ckpt.consolidated_state_dict(ckpt_dir)
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in full.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise UserFacingError(f"{ckpt_dir}: the checkpoint holds no '{ENCODER_PREFIX}*' parameters")
    torch_dtype = _DTYPES[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "mim-scale-encoder", "schema_version": str(SCHEMA_VERSION), "version": mim_scale.__version__}
    save_file({k: v.to(torch_dtype).contiguous() for k, v in encoder.items()}, str(out / ENCODER_FILE), metadata=meta)
    if full_state:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / FULL_FILE),
                  metadata={**meta, "format": "mim-scale-full"})
    data = _shard_summary(cfg.data.shards)
    config = {
        "schema_version": SCHEMA_VERSION,
        "architecture": "mim-hybrid-encoder",
        "software_version": mim_scale.__version__,
        "model": cfg.to_dict()["model"],
        "patch_size": cfg.model.patch_size,
        "input_size": [cfg.model.view_size] * 3,
        "in_channels": cfg.model.in_channels,
        "parameters": int(sum(v.numel() for v in encoder.values())),
        "dtype": dtype,
        "preprocessing": {
            # the shards store (D, H, W) = (z, y, x) of the LPS patient frame: array axes point to Superior,
            # Posterior, Left, which MONAI writes as Orientationd(axcodes="SPL")
            "orientation": "SPL",
            "axis_order": "(D, H, W) = (z, y, x) of the LPS patient frame",
            "spacing_mm": data.get("spacing_mm") or 1.5,
            "hu_min": cfg.data.hu_min,
            "hu_max": cfg.data.hu_max,
            "scaling": "clip HU to [hu_min, hu_max], then (hu - hu_min) / (hu_max - hu_min) -> [0, 1]",
            "pretraining_crop": cfg.data.crop_size,
            "pretraining_view": cfg.model.view_size,
        },
        "training": {"step": state.step, "samples_seen": state.samples_seen, "tokens_seen": state.tokens_seen,
                     "losses": state.losses, "masking": cfg.to_dict()["masking"], "data": data,
                     "checkpoint": str(ckpt_dir)},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (out / "README.md").write_text(_model_card(config))
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    (out / "SHA256SUMS").write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in files))
    return out


def _model_card(config: dict[str, Any]) -> str:
    t, p, m = config["training"], config["preprocessing"], config["model"]
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(t["losses"].items())) or "n/a"
    data = t.get("data") or {}
    datasets = ", ".join(f"{k} ({v} volumes)" for k, v in sorted((data.get("datasets") or {}).items())) or "unknown"
    return f"""# MiM foundation encoder (mim-scale {config['software_version']})

A 3D CT encoder pre-trained with MiM (Mask in Mask) by mim-scale: hybrid conv + transformer backbone,
widths {list(m['widths'])}, {m['encoder_depth']} transformer blocks, patch {config['patch_size']}, input
{config['input_size'][0]}^3, {config['parameters']:,} parameters ({config['dtype']}).

## Training
- steps: {t['step']}, crops seen: {t['samples_seen']}, visible tokens seen: {t['tokens_seen']}
- final losses: {losses}
- masking: levels {t['masking']['levels']}, ratios {t['masking']['level1_ratio']} / {t['masking']['level2_ratio']} / {t['masking']['level3_ratio']}
- data: {datasets}

## Preprocessing (apply the same at fine-tuning and inference)
- orientation {p['orientation']}, spacing {p['spacing_mm']} mm isotropic
- HU window [{p['hu_min']}, {p['hu_max']}]; {p['scaling']}

## Use
```python
from mim_scale import load_encoder
encoder, config = load_encoder("THIS_FOLDER")      # strict key matching, safetensors only
features = encoder.forward_features(x)              # x: (N, 1, {config['input_size'][0]}, {config['input_size'][0]}, {config['input_size'][0]}) in [0, 1]
```
Fine-tune: `mim-scale finetune --task segmentation --data dataset.json --init THIS_FOLDER`.

## Intended use
Research: initialisation for CT segmentation and classification models. Not a medical device; not for
clinical decisions. Files are checked by `sha256sum -c SHA256SUMS`.
"""


class KeyMismatchError(UserFacingError):
    def __init__(self, path: Path, missing: list[str], unexpected: list[str]):
        self.missing, self.unexpected = missing, unexpected
        super().__init__(f"{path}: encoder keys do not match (missing {len(missing)}: {missing[:8]}, "
                         f"unexpected {len(unexpected)}: {unexpected[:8]})")


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    file = path / ENCODER_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserFacingError(f"{path}: no {ENCODER_FILE} (expected an export folder or a .safetensors file)")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(file)), meta, file
    except Exception as exc:  # noqa: BLE001
        raise UserFacingError(f"{file}: not a readable safetensors file ({exc})") from exc


def _upgrade_keys(weights: dict[str, torch.Tensor], schema: int) -> dict[str, torch.Tensor]:
    """Map keys of an older schema to the current one (version 1 is current: nothing to map yet)."""
    if schema > SCHEMA_VERSION:
        raise UserFacingError(f"encoder key schema {schema} is newer than this mim-scale understands ({SCHEMA_VERSION})")
    return weights


def load_encoder_weights(encoder: torch.nn.Module, path: Path, strict: bool = True) -> dict[str, list[str]]:
    """Load exported weights into an existing encoder; returns {"missing": [...], "unexpected": [...]}."""
    weights, meta, file = _read_weights(path)
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


def load_encoder(path: str | Path, strict: bool = True, model_cfg: ModelConfig | None = None):
    """Build the encoder described by an export and load its weights: ``(encoder, config_dict)``.

    ``path`` is an export folder (config.json + encoder.safetensors) or a single safetensors file (then
    ``model_cfg`` must describe the architecture, unless the file sits in an export folder).
    """
    from mim_scale.model import build_encoder

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config: dict[str, Any] = {}
    if (folder / CONFIG_FILE).is_file():
        config = json.loads((folder / CONFIG_FILE).read_text())
    if model_cfg is None:
        if "model" not in config:
            raise UserFacingError(f"{path}: no {CONFIG_FILE} beside the weights; pass model_cfg= to describe the encoder")
        model_cfg = from_dict({"model": config["model"], "data": {"crop_size": 2 * config["model"]["view_size"]}}).model
    encoder = build_encoder(model_cfg)
    report = load_encoder_weights(encoder, path, strict=strict)
    config["load_report"] = report
    return encoder, config


def _run(args: argparse.Namespace) -> int:
    out = export_run(Path(args.run), Path(args.out), dtype=args.dtype, full_state=args.full)
    encoder, config = load_encoder(out)  # prove it loads, strictly, before saying it is done
    print(f"exported {config['parameters']:,} encoder parameters (step {config['training']['step']}) to {out}")
    for p in sorted(out.iterdir()):
        print(f"  {p}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="consolidate a run's checkpoint into a foundation encoder (safetensors)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a run folder (its latest checkpoint) or one checkpoint folder")
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="dtype of the exported weights")
    p.add_argument("--full", action="store_true", help="also write every pre-training parameter")
    p.set_defaults(func=_run)
