"""Foundation checkpoints: a ZeRO training checkpoint -> a consolidated encoder anyone can load.

    mim-scale export runs/quickstart --out exports/quickstart            # the run's latest checkpoint
    mim-scale export runs/quickstart/checkpoint_000001 --out exports/q1  # one checkpoint
    mim-scale export runs/base --out s3://lab-bucket/exports/base-v1     # straight to an object store
    mim-scale export runs/base --format monai-bundle --out bundles/base  # a MONAI bundle

The export folder holds:

- ``encoder.safetensors``: the hybrid encoder's weights (float32 by default), key schema version 1 below;
- ``config.json``: architecture (the ``model`` config section), patch and input size, preprocessing
  (orientation, spacing, HU window, scaling), training summary;
- ``README.md``: the model card, a Hugging Face Hub card (YAML front matter: licence from the training
  data's terms, tags, library name, data sets, metrics; see :mod:`mim_scale.model_card`), so the folder
  uploads as a Hub model repository as it is;
- ``evaluation.json`` with ``--evaluation REPORT`` (an ``evaluate`` report; its results go into the card);
- with ``--full``, ``mim_full.safetensors``: every pre-training parameter (decoder, alignment MLPs too);
- ``SHA256SUMS``: sha256 of every other file, written last: the one index that says the export is complete.

Writes are atomic: a local export is built in a hidden sibling folder, fsynced and renamed into place (an
older export there is replaced whole, no stale file survives); an ``s3://`` export uploads every file
first and ``SHA256SUMS`` last (see :mod:`mim_scale.export_store`).

The key schema and the loading API (``load_encoder``, ``load_encoder_weights``, ``locate_export``) live in
:mod:`mim_scale.model.io`, below the engine (fine-tuning and ``--init`` read exports without this command
module); they are re-exported here for existing callers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import mim_scale
from mim_scale import model_card
from mim_scale.config import from_dict
from mim_scale.errors import UserFacingError
from mim_scale.export_store import MAX_JSON_BYTES, SUMS_FILE, is_remote, publish_folder, write_sums
from mim_scale.fileutil import JSONFileError, read_json_bounded
# the loading API and key schema, owned by mim_scale.model.io; re-exported for `from mim_scale.export import ...`
from mim_scale.model.io import (CONFIG_FILE, ENCODER_FILE, ENCODER_PREFIX, FULL_FILE, SCHEMA_VERSION,  # noqa: F401
                                KeyMismatchError, encoder_config, encoder_file_metadata, load_encoder,
                                load_encoder_weights, locate_export, model_config_of, preprocessing_block)

EVALUATION_FILE = "evaluation.json"
FORMATS = ("mim", "monai-bundle")
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
    licenses = manifest.get("licenses") if isinstance(manifest.get("licenses"), dict) else {}
    return {"datasets": datasets, "spacing_mm": build.get("spacing", manifest.get("spacing_mm")),
            "shards": len(manifest.get("shards", [])), "samples": sum(datasets.values()),
            "manifest_licenses": licenses}


def _staging_folder(out: str | Path) -> Path:
    """Where an export is built before it is published: a hidden sibling of a local ``out`` (same file
    system, so the final rename is atomic), a private temporary folder for an object store."""
    import os
    import tempfile

    if is_remote(out):
        return Path(tempfile.mkdtemp(prefix="mim-export-"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def export_run(run: Path, out: str | Path, *, dtype: str = "float32", full_state: bool = False,
               fmt: str = "mim", data_licenses: dict[str, str] | None = None,
               evaluation: str | Path | None = None) -> Path | str:
    """Consolidate the latest checkpoint under ``run`` (any ZeRO stage, any worker count) into ``out``.

    ``out``: a local folder (returned as a Path) or an ``s3://bucket/prefix/NAME`` URI (returned as str).
    ``fmt``: ``"mim"`` (the export folder, Hub-ready) or ``"monai-bundle"`` (:mod:`mim_scale.monai_bundle`).
    ``data_licenses``: {data set: Hub licence id}, overriding the manifest's and the known table's.
    ``evaluation``: an ``evaluate`` JSON report to ship as ``evaluation.json`` (and in the card).
    """
    from mim_scale.engine import checkpoint as ckpt
    from mim_scale.launcher.runs import committed_checkpoint

    if fmt not in FORMATS:
        raise UserFacingError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if dtype not in _DTYPES:
        raise UserFacingError(f"unknown dtype {dtype!r} (one of {', '.join(sorted(_DTYPES))})")
    from mim_scale import monai_bundle

    if fmt == "monai-bundle" and (full_state or evaluation is not None):
        raise UserFacingError("--full and --evaluation belong to the export folder format, not a MONAI bundle")
    if monai_bundle.is_finetune_run(Path(run)):
        if fmt != "monai-bundle":
            raise UserFacingError(f"{run}: a fine-tuning run exports as --format monai-bundle (its network and head)")
        return _publish(out, lambda tmp: monai_bundle.write_finetuned_bundle(tmp, Path(run)))
    # a Ray run: the newest checkpoint Ray committed (a crash mid-upload leaves a partial folder that only
    # Ray's own list tells apart); a checkpoint folder or a local run: the newest complete one
    committed = None if (Path(run) / ckpt.STATE_FILE).is_file() else committed_checkpoint(str(run))
    try:
        ckpt_dir = Path(committed) if committed else ckpt.latest_checkpoint(Path(run))
    except FileNotFoundError as exc:
        raise UserFacingError(str(exc)) from exc
    report = None
    if evaluation is not None:
        report = _read_evaluation(Path(evaluation))
    state = ckpt.TrainState.read(ckpt_dir)
    cfg = from_dict(state.config)
    full = ckpt.consolidated_state_dict(ckpt_dir)
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in full.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise UserFacingError(f"{ckpt_dir}: the checkpoint holds no '{ENCODER_PREFIX}*' parameters")
    torch_dtype = _DTYPES[dtype]
    data = _shard_summary(cfg.data.shards)
    manifest_licenses = data.pop("manifest_licenses", {})
    unknown = sorted(set(data_licenses or {}) - set(data.get("datasets") or {})) if data.get("datasets") else []
    if unknown:
        raise UserFacingError(f"--data-license names {unknown}, which the run's shards do not hold "
                              f"(data sets: {sorted(data['datasets'])})")
    if data.get("datasets") is not None or data_licenses:
        data["licenses"] = model_card.data_licenses(data.get("datasets") or dict.fromkeys(data_licenses or {}, 0),
                                                    data_licenses, manifest_licenses)
    # the shards store (D, H, W) = (z, y, x) of the LPS patient frame: array axes point to Superior, Posterior,
    # Left, which MONAI writes as Orientationd(axcodes="SPL")
    preprocessing = preprocessing_block(cfg, "SPL", data.get("spacing_mm") or 1.5,
                                        axis_order="(D, H, W) = (z, y, x) of the LPS patient frame")
    training = {"step": state.step, "samples_seen": state.samples_seen, "tokens_seen": state.tokens_seen,
                "losses": state.losses, "masking": cfg.to_dict()["masking"], "data": data, "checkpoint": str(ckpt_dir)}
    config = encoder_config(cfg, version=mim_scale.__version__, parameters=int(sum(v.numel() for v in encoder.values())),
                            dtype=dtype, preprocessing=preprocessing, training=training,
                            library_name=model_card.LIBRARY_NAME)
    config["exported_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    weights = {k: v.to(torch_dtype).contiguous() for k, v in encoder.items()}
    if fmt == "monai-bundle":
        return _publish(out, lambda tmp: monai_bundle.write_bundle(tmp, weights, config))
    return _publish(out, lambda tmp: _write_export(tmp, weights, config, full if full_state else None, report))


def _publish(out: str | Path, write) -> Path | str:
    """Build the export with ``write(folder)`` in a staging folder, index it, publish it atomically."""
    tmp = _staging_folder(out)
    try:
        write(tmp)
        write_sums(tmp)  # last: the index that says the export is complete
        published = publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return published if is_remote(out) else Path(published)


def _write_export(folder: Path, weights: dict[str, torch.Tensor], config: dict[str, Any],
                  full: dict[str, torch.Tensor] | None, evaluation: dict[str, Any] | None) -> None:
    from safetensors.torch import save_file

    meta = encoder_file_metadata(mim_scale.__version__)
    save_file(weights, str(folder / ENCODER_FILE), metadata=meta)
    if full is not None:
        save_file({k: v.contiguous() for k, v in full.items()}, str(folder / FULL_FILE),
                  metadata={**meta, "format": "mim-scale-full"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if evaluation is not None:
        (folder / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=1))
    (folder / "README.md").write_text(model_card.render(config, evaluation))


def _read_evaluation(path: Path) -> dict[str, Any]:
    """An ``evaluate`` report (JSON, bounded), checked for the fields the card reads."""
    if not path.is_file():
        raise UserFacingError(f"--evaluation {path}: no such file")
    try:
        report = read_json_bounded(path, MAX_JSON_BYTES, "not an evaluate report")
    except JSONFileError as exc:
        raise UserFacingError(f"--evaluation {path}: {exc}") from exc
    if not isinstance(report, dict) or not isinstance(report.get("runs"), dict):
        raise UserFacingError(f"--evaluation {path}: not a `mim-scale evaluate` report (no 'runs')")
    return report


def _parse_licenses(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, lic = item.partition("=")
        if not sep or not name or not lic:
            raise UserFacingError(f"--data-license {item!r}: expected NAME=LICENSE (a Hub licence id, e.g. cc-by-4.0)")
        out[name] = lic
    return out


def _run(args: argparse.Namespace) -> int:
    out = export_run(Path(args.run), args.out, dtype=args.dtype, full_state=args.full, fmt=args.format,
                     data_licenses=_parse_licenses(args.data_license), evaluation=args.evaluation)
    if args.format == "monai-bundle":
        from mim_scale.monai_bundle import load_bundle_network

        net, _ = load_bundle_network(out)  # prove the bundle's own config builds and loads it
        n = sum(p.numel() for p in net.parameters())
        print(f"exported a MONAI bundle ({n:,} parameters) to {out}")
    else:
        encoder, config = load_encoder(out)  # prove it loads, strictly, every sha256 checked, before saying so
        print(f"exported {config['parameters']:,} encoder parameters (step {config['training']['step']}) to {out}")
    if is_remote(out):
        print(f"  complete: {out}/{SUMS_FILE} written last")
    else:
        for p in sorted(Path(out).rglob("*")):
            if p.is_file():
                print(f"  {p}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="consolidate a run's checkpoint into a foundation encoder (safetensors)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a run folder (its latest checkpoint) or one checkpoint folder; "
                                                  "with --format monai-bundle also a `mim-scale finetune` run")
    p.add_argument("--out", required=True, help="export folder, or s3://bucket/prefix/NAME")
    p.add_argument("--format", default="mim", choices=FORMATS,
                   help="mim: the export folder (Hub-ready); monai-bundle: a MONAI bundle")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="dtype of the exported weights")
    p.add_argument("--full", action="store_true", help="also write every pre-training parameter")
    p.add_argument("--data-license", action="append", default=[], metavar="DATASET=LICENSE",
                   help="licence of a training data set (Hub id, e.g. cc-by-4.0); the card's licence follows them")
    p.add_argument("--evaluation", default=None, metavar="REPORT",
                   help="a `mim-scale evaluate` JSON report to ship with the weights (results go into the card)")
    p.set_defaults(func=_run)
