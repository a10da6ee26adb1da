"""Fine-tuning checkpoints: safetensors for tensors, JSON for everything else; no pickle anywhere.

A checkpoint is a folder ``<run>/checkpoints/step_<NNNNNNNN>/`` holding

- ``model.safetensors``: the network's state dict (``encoder.*`` keys are the pre-trained part);
- ``optimizer.safetensors``: AdamW per-parameter state, keys ``<param index>.<name>`` (step, exp_avg, ...);
- ``state.json``: step, the optimizer's param groups (without tensors), best validation score, and
  the metric history. Written last, so a folder without it is incomplete.

The folder is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint that ``latest_checkpoint`` would pick.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mim_scale.errors import UserFacingError
from mim_scale.fileutil import write_atomic
from mim_scale.rundir import CHECKPOINTS_DIR, step_checkpoints

STEP_PREFIX = "step_"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int) -> Path:
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{STEP_PREFIX}{step:08d}"
    tmp = ckpt_root / f".tmp_{STEP_PREFIX}{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(tmp / "model.safetensors", model)
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "state.json", {**state, "step": step, "optimizer": opt_meta})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_model(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (``state.json`` is written last), oldest first."""
    return step_checkpoints(run_dir, lambda p: (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model (strict) and optimizer in place; return the JSON state (with ``step``)."""
    path = Path(path)
    state = read_json(path / "state.json")
    load_model(path / "model.safetensors", model)
    if optimizer is not None:
        opt_file = path / "optimizer.safetensors"
        if not opt_file.is_file():
            raise UserFacingError(f"{path}: missing optimizer.safetensors; cannot resume")
        optimizer.load_state_dict(_join_optimizer_state(load_file(str(opt_file)), state["optimizer"]))
    return state


def load_model(path: Path, model: nn.Module) -> None:
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"model weights not found: {path}")
    tensors = load_file(str(path))
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserFacingError(f"{path}: weights do not match the network: "
                              f"{len(result.missing_keys)} missing {result.missing_keys[:5]}, "
                              f"{len(result.unexpected_keys)} unexpected {result.unexpected_keys[:5]}")


def read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserFacingError(f"{path}: not valid JSON ({exc})") from exc


def _write_json(path: Path, tree: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(tree, indent=2))  # key order matters: class order = channel order


def write_json(path: Path, tree: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_json(Path(path), tree)


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}
