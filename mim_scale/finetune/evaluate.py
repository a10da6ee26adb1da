"""``mim-scale evaluate``: JSON reports of fine-tuned runs, and pretrained-vs-scratch comparisons.

Two modes:

- :func:`evaluate_run`: load a finished fine-tuning run (its ``run.json`` and newest checkpoint), run
  validation on a dataset's ``validation`` split (by default the run's own dataset) and report.
- :func:`compare_inits`: fine-tune from each ``--init`` (exported encoders, plus ``scratch`` with the
  same architecture) with the same recipe, seed and step budget, then report every run's metrics and
  each pretrained run's gain over scratch. This is how a checkpoint's value becomes a number.

Report schema (``format`` 1)::

    {"format": 1, "kind": "evaluation" | "comparison", "task": ..., "data": ..., "recipe": {...},
     "runs": {"<label>": {"init": ..., "pretrained": bool, "steps": N, "samples_seen": N,
                          "seconds": s, "validation": {...metrics...}, "run_dir": ...}},
     "delta_vs_scratch": {"<label>": {"mean_dice" | "accuracy": d, "per_class_dice": {...}}},
     "software": {...}}
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from mim_scale.errors import UserFacingError
from mim_scale.finetune.build import EncoderInit, build_network, model_config_from_meta
from mim_scale.finetune.checkpoint import latest_checkpoint, load_model, read_json, write_json
from mim_scale.finetune.data import class_names, deterministic_transforms, load_cached, read_dataset
from mim_scale.finetune.recipe import load_recipe, recipe_from_dict
from mim_scale.finetune.train import finetune, resolve_device, software_versions
from mim_scale.finetune.validation import classification_metrics, segmentation_metrics

REPORT_FORMAT = 1


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, out: str | Path | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate a fine-tuned run's newest checkpoint; write the report to ``out`` if given."""
    from mim_scale.model.encoder import build_encoder

    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserFacingError(f"{run_dir}: no complete checkpoint (checkpoints/step_*/state.json) to evaluate")
    recipe = recipe_from_dict(info["recipe"])
    model_cfg = model_config_from_meta(info, str(run_dir / "run.json"))
    data = Path(data) if data else Path(info["data"])
    spec = read_dataset(data, recipe.task)
    names = class_names(recipe, spec)
    if names != info["classes"]:
        raise UserFacingError(f"{data}: classes {names} differ from the run's {info['classes']}")
    roi = tuple(info["roi_size"])
    enc = EncoderInit(build_encoder(model_cfg), model_cfg, info["init"], {})
    model = build_network(recipe, enc, len(names))
    load_model(ckpt / "model.safetensors", model)
    model.to(resolve_device(recipe.train.device))
    t0 = time.perf_counter()
    cache = load_cached(spec.validation, deterministic_transforms(recipe, roi, with_label=True), spec.source)
    for item, src in zip(cache, spec.validation):
        item["image_path"] = src["image"]
    metrics = (segmentation_metrics(model, cache, roi, recipe, names) if recipe.task == "segmentation"
               else classification_metrics(model, cache, names, recipe.train.precision))
    state = read_json(ckpt / "state.json")
    report = {
        "format": REPORT_FORMAT,
        "kind": "evaluation",
        "task": recipe.task,
        "data": str(data.resolve()),
        "recipe": info["recipe"],
        "runs": {"finetuned": {"init": info["init"], "pretrained": info["init"] != "scratch",
                               "steps": int(state["step"]), "checkpoint": str(ckpt),
                               "seconds": time.perf_counter() - t0, "validation": metrics,
                               "run_dir": str(run_dir.resolve())}},
        "software": software_versions(),
    }
    if out:
        write_json(Path(out), report)
        log(f"wrote {out}")
    return report


def compare_inits(data: str | Path, inits: list[str], out_dir: str | Path, report: str | Path | None = None,
                  recipe: str | Path | None = None, overrides: list[str] | None = None,
                  model_config: str | None = None, with_scratch: bool = True,
                  log: Callable[[str], None] = print,
                  progress: Callable[[str], Callable[[dict[str, Any]], None]] | None = None) -> dict[str, Any]:
    """Fine-tune once per init with the same recipe and budget; report metrics and gains over scratch.

    ``progress``: given a run's label, the progress callback for its fine-tuning (see ``finetune``).

    ``inits``: exported encoders and/or ``"scratch"``. Scratch uses the architecture of the first
    exported encoder (so the comparison is like for like), else ``model_config``.
    """
    if not inits:
        raise UserFacingError("evaluate needs at least one --init (an exported encoder or 'scratch')")
    out_dir = Path(out_dir)
    inits = list(dict.fromkeys(inits))
    if with_scratch and "scratch" not in inits:
        inits.append("scratch")
    pretrained = [i for i in inits if i != "scratch"]
    first = None
    if pretrained:
        from mim_scale.finetune.build import resolve_init

        first = resolve_init(pretrained[0], model_config)
    elif model_config is None:
        raise UserFacingError("evaluate with only --init scratch needs --model")
    # resolve the recipe once, so every run (scratch included) gets the same preprocessing and budget:
    # the first exported encoder's preprocessing is the default
    rec = load_recipe(recipe, overrides, first.meta.get("preprocessing") if first else None)
    scratch_model = first.model if first else model_config
    runs: dict[str, Any] = {}
    for init in inits:
        label = "scratch" if init == "scratch" else f"pretrained:{Path(init).name}"
        while label in runs:
            label += "+"
        run_dir = out_dir / _slug(label)
        log(f"== {label}: fine-tuning into {run_dir}")
        summary = finetune(data, init, run_dir, recipe=rec,
                           model_config=scratch_model if init == "scratch" else model_config, log=log,
                           progress=progress(label) if progress is not None else None)
        runs[label] = {"init": summary["init"], "pretrained": summary["pretrained"], "steps": summary["steps"],
                       "samples_seen": summary["samples_seen"], "seconds": summary["seconds"],
                       "validation": summary["validation"], "run_dir": str(run_dir.resolve())}
    # every run must have trained with the same resolved recipe for the comparison to mean anything
    recipes = {_slug(k): read_json(Path(v["run_dir"]) / "run.json")["recipe"] for k, v in runs.items()}
    if len({repr(sorted(r.items())) for r in recipes.values()}) != 1:
        raise RuntimeError(f"runs under {out_dir} trained with different recipes; the comparison is void")
    task = next(iter(recipes.values()))["task"]
    result = {
        "format": REPORT_FORMAT,
        "kind": "comparison",
        "task": task,
        "data": str(Path(data).resolve()),
        "recipe": next(iter(recipes.values())),
        "runs": runs,
        "delta_vs_scratch": _deltas(runs),
        "software": software_versions(),
    }
    if report:
        write_json(Path(report), result)
        log(f"wrote {report}")
    return result


def _deltas(runs: dict[str, Any]) -> dict[str, Any]:
    base = runs.get("scratch")
    if base is None:
        return {}
    out = {}
    bv = base["validation"]
    for label, run in runs.items():
        if label == "scratch":
            continue
        v = run["validation"]
        if "per_class_dice" in v:
            per = {k: (None if v["per_class_dice"][k] is None or bv["per_class_dice"].get(k) is None
                       else v["per_class_dice"][k] - bv["per_class_dice"][k]) for k in v["per_class_dice"]}
            out[label] = {"mean_dice": _diff(v["mean_dice"], bv["mean_dice"]), "per_class_dice": per}
        else:
            out[label] = {"accuracy": _diff(v["accuracy"], bv["accuracy"]),
                          "auc": _diff(v.get("auc"), bv.get("auc"))}
    return out


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def load_run_recipe(run_dir: str | Path):
    """The resolved recipe a run trained with (for re-running it elsewhere)."""
    return load_recipe(read_json(Path(run_dir) / "run.json")["recipe"])


__all__ = ["compare_inits", "evaluate_run", "load_run_recipe"]
