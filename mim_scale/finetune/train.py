"""The single-process fine-tuning loop.

``finetune(data=..., init=..., out=...)`` writes a run folder::

    OUT/run.json            recipe, encoder architecture, init source, class names, dataset, versions
    OUT/metrics.jsonl       one line per logged step (loss, lr, seconds) and per validation
    OUT/checkpoints/step_N/ model.safetensors, optimizer.safetensors, state.json (see checkpoint.py)
    OUT/summary.json        final validation metrics, steps, wall time

Resuming (``resume=True``) continues from the newest complete checkpoint in OUT; batches and the
lr schedule are functions of the step, so the resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import monai
import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from mim_scale.config import ModelConfig
from mim_scale.errors import UserFacingError
from mim_scale.finetune.build import EncoderInit, build_network, resolve_init, roi_for
from mim_scale.finetune.checkpoint import latest_checkpoint, load_checkpoint, read_json, save_checkpoint, write_json
from mim_scale.finetune.data import (TrainSampler, class_names, deterministic_transforms, load_cached, read_dataset)
from mim_scale.finetune.optim import lr_at, param_groups
from mim_scale.finetune.recipe import Recipe, load_recipe
from mim_scale.finetune.validation import autocast, classification_metrics, headline, segmentation_metrics
from mim_scale.tensorboard import open_board

RUN_FORMAT = 1


def finetune(
    data: str | Path,
    init: str,
    out: str | Path,
    recipe: str | Path | dict | Recipe | None = None,
    overrides: list[str] | None = None,
    model_config: str | ModelConfig | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    tensorboard: bool = True,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune from ``init`` (an exported encoder or ``"scratch"``); return the summary dict.

    ``progress`` (lead rank): called every ``train.log_every`` steps and after each validation with
    ``{step, total, epoch, loss}`` / ``{step, total, epoch, dice}`` (mean Dice; segmentation); the per-step
    log lines are left out then (the command line draws one progress line instead).

    ``tensorboard``: the lead rank writes loss, lr and Dice per class to ``OUT/tensorboard/`` when the
    package is installed (:mod:`mim_scale.tensorboard`)."""
    t_start = time.perf_counter()
    out = Path(out)
    enc_init = _init_with_seed(init, model_config, recipe, overrides)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides, enc_init.meta.get("preprocessing"))
    if isinstance(recipe, Recipe) and overrides:
        rec = rec.replace(overrides)
    t = rec.train
    if t.threads:
        torch.set_num_threads(t.threads)
    spec = read_dataset(data, rec.task)
    names = class_names(rec, spec)
    roi = roi_for(rec, enc_init.model)

    rank, world, local_rank = dist_info()
    if t.batch_size % world:
        raise UserFacingError(f"train.batch_size={t.batch_size} must be divisible by the {world} workers "
                              "(it is the global batch, split across them)")
    device = resolve_device(t.device, local_rank)
    torch.manual_seed(t.seed + 1)  # new modules (deep stage, decoder, head) draw from their own seed
    model = build_network(rec, enc_init, len(names)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay, t.layer_decay), lr=t.lr, betas=tuple(t.betas))
    lead = rank == 0
    if not lead:
        log = _quiet

    run_info = {
        "format": RUN_FORMAT,
        "task": rec.task,
        "data": str(Path(data).resolve()),
        "init": enc_init.source,
        "model": _jsonable(enc_init.model.__dict__),
        "recipe": rec.to_dict(),
        "classes": names,
        "roi_size": list(roi),
        "device": str(device),
        "workers": world,
        "software": software_versions(),
    }
    start_step, history, best = 0, [], None
    ckpt = latest_checkpoint(out) if resume else None
    if resume and (out / "run.json").is_file():
        _check_same_run(read_json(out / "run.json"), run_info, out)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start_step, history, best = int(state["step"]), state.get("history", []), state.get("best")
        log(f"resumed from {ckpt} at step {start_step}")
    elif not resume and latest_checkpoint(out) is not None:
        raise UserFacingError(f"{out} already holds checkpoints; pass --resume to continue it or choose a new --out")
    _barrier(world)  # every rank has read the old state before the lead rewrites it
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", run_info)
    board = open_board(tensorboard, out, rank)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: the encoder's fusion convs serve pre-training only
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)

    log(f"caching {len(spec.training)} training and {len(spec.validation)} validation volumes "
        f"(spacing {list(rec.preprocessing.spacing)} mm, HU [{rec.preprocessing.hu_min}, {rec.preprocessing.hu_max}])")
    train_cache = load_cached(spec.training, deterministic_transforms(rec, roi, with_label=True), spec.source)
    val_cache = _val_cache(rec, spec, roi) if lead else []
    sampler = TrainSampler(train_cache, rec, roi)
    loss_fn = _loss(rec)

    def validate(step: int) -> dict[str, Any] | None:
        if not lead:  # validation and checkpoints are the lead rank's; the others wait at the barrier
            return None
        metrics = (segmentation_metrics(model, val_cache, roi, rec, names) if rec.task == "segmentation"
                   else classification_metrics(model, val_cache, names, t.precision))
        entry = {"step": step, "validation": {k: v for k, v in metrics.items() if k != "per_volume"}}
        _append_jsonl(out / "metrics.jsonl", entry)
        history.append(entry)
        if board is not None:
            board.finetune_validation(step, metrics)
        log(f"step {step} validation: {_brief(metrics)}")
        if progress is not None:
            progress({"step": step, "total": t.steps, "epoch": epoch_of(step), "dice": metrics.get("mean_dice")})
        return metrics

    def epoch_of(step: int) -> float:
        """Passes over the training volumes (each step draws train.batch_size crops)."""
        return step * t.batch_size / max(1, len(spec.training))

    net.train()
    metrics: dict[str, Any] | None = None
    t_loop = time.perf_counter()
    for step in range(start_step, t.steps):
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        batch = sampler.batch(step, rank, world)
        torch.manual_seed(t.seed * 1_000_003 + step)  # dropout and any other torch randomness
        with autocast(device, t.precision):
            logits = net(batch["image"].to(device, non_blocking=True))
        loss = loss_fn(logits.float(), batch["label"].to(device, non_blocking=True))
        if not torch.isfinite(loss):
            raise UserFacingError(f"fine-tuning loss is {float(loss)} at step {step}; lower train.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            mean_loss = _mean_over_ranks(loss.detach(), world)
            if lead:
                _append_jsonl(out / "metrics.jsonl", {"step": done, "loss": mean_loss, "lr": lr,
                                                      "seconds": time.perf_counter() - t_loop})
                if board is not None:
                    board.finetune_step(done, mean_loss, lr)
            if progress is None:
                log(f"step {done}/{t.steps} loss {mean_loss:.4f} lr {lr:.2e}")
            elif lead:
                progress({"step": done, "total": t.steps, "epoch": epoch_of(done), "loss": mean_loss})
        if t.val_every and done % t.val_every == 0 and done != t.steps:
            metrics = validate(done)
            best = _better(best, metrics)
            _barrier(world)
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps:
            if done == t.steps:
                metrics = validate(done)
                best = _better(best, metrics)
            if lead:
                save_checkpoint(out, done, model, optimizer, {"history": history, "best": best}, t.keep_last)
            _barrier(world)
    if start_step >= t.steps:  # resumed at the last step: nothing trained, just validate
        metrics = validate(t.steps)
    if board is not None:
        board.close()
    if not lead:
        return {"task": rec.task, "rank": rank, "workers": world, "steps": t.steps}
    summary = {
        "task": rec.task,
        "init": enc_init.source,
        "pretrained": enc_init.pretrained,
        "steps": t.steps,
        "samples_seen": t.steps * t.batch_size,
        "workers": world,
        "validation": metrics,
        "best_score": best,
        "classes": names,
        "seconds": time.perf_counter() - t_start,
        "checkpoint": str(latest_checkpoint(out)),
    }
    write_json(out / "summary.json", summary)
    return summary


def _init_with_seed(init: str, model_config, recipe, overrides) -> EncoderInit:
    # the scratch encoder's random init must depend on the recipe's seed only
    seed = 0
    if isinstance(recipe, Recipe):
        seed = recipe.train.seed
    else:
        try:
            seed = load_recipe(recipe, overrides).train.seed
        except Exception:  # noqa: BLE001 - the real recipe load below reports any problem
            seed = 0
    torch.manual_seed(seed)
    return resolve_init(init, model_config)


def _val_cache(rec: Recipe, spec, roi) -> list[dict[str, Any]]:
    if rec.task == "segmentation":
        # whole volumes: padded to the ROI so the sliding window always fits
        cache = load_cached(spec.validation, deterministic_transforms(rec, roi, with_label=True), spec.source)
    else:
        cache = load_cached(spec.validation, deterministic_transforms(rec, roi, with_label=False), spec.source)
    for item, src in zip(cache, spec.validation):
        item["image_path"] = src["image"]
    return cache


def _loss(rec: Recipe) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if rec.task == "segmentation":
        return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    ce = nn.CrossEntropyLoss()
    return lambda logits, labels: ce(logits, labels)


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) of an initialised torch.distributed group, else (0, 1, 0)."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _better(best: float | None, metrics: dict[str, Any] | None) -> float | None:
    score = headline(metrics) if metrics else None
    return score if best is None or (score is not None and score > best) else best


def _quiet(_msg: str) -> None:
    pass


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserFacingError(f"train.device={name}: no CUDA device is available (use auto or cpu)")
    return device


# settings that may change between a run and its resumption without changing what is computed
_RESUMABLE = {"device", "threads", "log_every"}


def _check_same_run(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    for key in ("task", "init", "model", "recipe", "classes"):
        a, b = old.get(key), new.get(key)
        if key == "recipe":
            a, b = _strip_resumable(a), _strip_resumable(b)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            raise UserFacingError(f"{out}: cannot resume: '{key}' differs from the run being resumed "
                                  f"(see {out / 'run.json'})")


def _strip_resumable(recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    if not recipe:
        return recipe
    train = {k: v for k, v in recipe.get("train", {}).items() if k not in _RESUMABLE}
    return {**recipe, "train": train}


def _append_jsonl(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


def _brief(metrics: dict[str, Any]) -> str:
    if "per_class_dice" in metrics:
        parts = [f"{k} {v:.3f}" if v is not None else f"{k} absent" for k, v in metrics["per_class_dice"].items()]
        mean = metrics["mean_dice"]
        return f"mean Dice {mean:.3f} ({', '.join(parts)})" if mean is not None else "no class present"
    return (f"accuracy {metrics['accuracy']:.3f} balanced {metrics['balanced_accuracy']:.3f} "
            f"loss {metrics['loss']:.3f}") + (
        f" AUC {metrics['auc']:.3f}" if "auc" in metrics else "")


def _jsonable(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in tree.items()}


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("mim-scale")
    except PackageNotFoundError:
        ours = "unknown"
    return {"mim_scale": ours, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
