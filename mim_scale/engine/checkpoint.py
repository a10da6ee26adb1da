"""Training checkpoints: the layout-free full state (safetensors) plus JSON, and DeepSpeed's own files.

Layout of one checkpoint directory (what ``ray.train.report`` persists, or what the local writer renames
into place)::

    state.json              step, samples/tokens seen, stream position, config, version, restarts,
                            scheduler position, DeepSpeed's step counters and loss scale (written last: its
                            presence marks a complete checkpoint)
    rng-rank<r>.json        each rank's torch / numpy / python RNG states
    full_state.safetensors  fp32 masters + AdamW moments per parameter and the optimizer step (see
                            ``full_state``): what resume, resharding, consolidation and export read
    mim/                    DeepSpeed's tag folder: model states (rank 0) + ZeRO optimizer shards (every rank)
    latest                  DeepSpeed's pointer to the tag

Nothing is unpickled on load. DeepSpeed's ``*.pt`` files are pickles (``load_checkpoint`` calls ``torch.load``
with ``weights_only=False``): whoever can write to the run storage would run code on every rank at the next
restart. So :func:`load` never calls DeepSpeed's loader: model, optimizer (masters, moments, step), schedule,
DeepSpeed's counters and loss scale, and RNG come from ``full_state.safetensors`` and the JSON files, on the
same layout or another one. DeepSpeed's files are still written (DeepSpeed's own tools, such as
``zero_to_fp32.py``, read them for operators who trust them); mim-scale reads none of them.

Atomicity: ranks write into ``step_N.tmp`` (or a Ray scratch folder), ``state.json`` is written by rank 0
after every rank's files (the full-state gather is a collective that follows each rank's DeepSpeed save),
then the folder is renamed into place. A crash at any point leaves the previous checkpoint complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mim_scale
from mim_scale.fileutil import write_atomic
from mim_scale.rundir import step_of

TAG = "mim"
STATE_FILE = "state.json"
STATE_FORMAT = "mim-scale-train-state"
STATE_VERSION = 1


@dataclass
class TrainState:
    """Everything besides tensors that a resume needs."""

    step: int = 0  # optimizer steps completed
    samples_seen: int = 0  # crops consumed, all ranks together
    tokens_seen: int = 0  # visible tokens through the encoder, all ranks together
    views_seen: int = 0  # masked views through the model, all ranks together
    volumes_seen: int = 0  # volume reads the crops came from, all ranks together
    world_size: int = 1
    micro_batch: int = 1
    grad_accum: int = 1
    stream_seed: int = 0
    batches_consumed_per_rank: int = 0  # DataLoader batches each rank consumed on this stream
    restarts: int = 0
    scheduler_epoch: int = 0  # LambdaLR's last_epoch (optimizer steps the schedule has advanced)
    corrupt_skipped: int = 0  # corrupt samples/shards skipped, all ranks together
    losses: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)  # DeepSpeed's counters and loss scale (engine_state)
    version: str = mim_scale.__version__
    format: str = STATE_FORMAT
    format_version: int = STATE_VERSION

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def read(cls, ckpt_dir: Path) -> "TrainState":
        path = Path(ckpt_dir) / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path}: not a mim-scale checkpoint (no {STATE_FILE})") from exc
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r} is not {STATE_FORMAT!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save(engine, ckpt_dir: Path, state: TrainState, rank: int) -> int:
    """Collective: every rank writes its part of the DeepSpeed checkpoint and its RNG states into
    ``ckpt_dir``; rank 0 adds the full fp32 state and, last, ``state.json``. Returns the bytes written."""
    from mim_scale.engine import full_state

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(ckpt_dir / f"rng-rank{rank}.json", json.dumps(rng_state()))
    engine.save_checkpoint(str(ckpt_dir), tag=TAG, client_state={"step": state.step})
    full_state.save(engine, ckpt_dir, rank)
    if rank == 0:
        write_atomic(ckpt_dir / STATE_FILE, replace(state, engine=engine_state(engine)).to_json())
    return _dir_bytes(ckpt_dir)


# DeepSpeed engine counters and (fp16) loss-scaler fields that its pickled checkpoint would restore
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
_SCALER_FIELDS = {"cur_scale": float, "cur_iter": int, "last_overflow_iter": int, "cur_hysteresis": int}


def _number(x: Any) -> float | None:
    if torch.is_tensor(x) and x.numel() == 1:
        return float(x.item())
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def engine_state(engine) -> dict[str, Any]:
    """DeepSpeed's step counters and, for fp16, its dynamic loss scale, as JSON values."""
    out: dict[str, Any] = {}
    for key in _ENGINE_COUNTERS:
        value = _number(getattr(engine, key, None))
        if value is not None:
            out[key] = int(value)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        fields = {k: _number(getattr(scaler, k, None)) for k in _SCALER_FIELDS}
        out["loss_scaler"] = {k: v for k, v in fields.items() if v is not None}
    return out


def set_engine_state(engine, saved: dict[str, Any]) -> None:
    """Inverse of :func:`engine_state` (values of the wrong type are ignored, not trusted)."""
    for key in _ENGINE_COUNTERS:
        if isinstance(saved.get(key), int) and hasattr(engine, key):
            setattr(engine, key, int(saved[key]))
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in (saved.get("loss_scaler") or {}).items():
        if scaler is None or key not in _SCALER_FIELDS or not isinstance(value, (int, float)):
            continue
        current = getattr(scaler, key, None)
        cast = _SCALER_FIELDS[key](value)
        if torch.is_tensor(current):
            current.fill_(cast)
        elif current is not None:
            setattr(scaler, key, cast)


def _dir_bytes(folder: Path) -> int:
    """Bytes under ``folder``, tolerating files another rank renames meanwhile."""
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def load(engine, ckpt_dir: Path, rank: int = 0, world_size: int | None = None, scheduler=None) -> TrainState:
    """Restore model, optimizer, scheduler, DeepSpeed's counters and RNG into ``engine``; return the saved
    :class:`TrainState`. Reads only ``full_state.safetensors`` and JSON (nothing is unpickled).

    Any worker count: the full fp32 state is scattered onto this engine's layout (:func:`full_state.restore`:
    masters, AdamW moments and step) and the schedule is moved to the saved step. On the layout that saved
    it the RNG states continue too, so the run is the one that never stopped (tested to 1e-6 in fp32).
    """
    from mim_scale.engine import full_state

    state = TrainState.read(ckpt_dir)
    full_state.restore(engine, ckpt_dir)
    set_engine_state(engine, state.engine)
    if scheduler is not None:
        epoch = state.scheduler_epoch or state.step
        scheduler.last_epoch = epoch
        lrs = [base * fn(epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
        for group, lr in zip(engine.optimizer.param_groups, lrs):
            group["lr"] = lr
    if world_size is None or world_size == state.world_size:
        rng_file = Path(ckpt_dir) / f"rng-rank{rank}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
    return state


def commit_local(tmp_dir: Path, final_dir: Path, keep_last: int) -> None:
    """For runs outside Ray: rename a finished checkpoint into place and prune old ones."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    siblings = sorted((p for p in final_dir.parent.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)
    for old in siblings[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints under a run folder (Ray's ``checkpoint_*`` or local ``step_*``), oldest first."""
    run_dir = Path(run_dir)
    if (run_dir / STATE_FILE).is_file():
        return [run_dir]
    found = [p.parent for p in run_dir.rglob(STATE_FILE) if not p.parent.name.endswith(".tmp")]
    found = [p for p in found if (p / TAG).is_dir()]
    return sorted(found, key=lambda p: (TrainState.read(p).step, p.stat().st_mtime))


def latest_checkpoint(run_dir: Path) -> Path:
    found = find_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint (a folder with {STATE_FILE} and {TAG}/)")
    return found[-1]


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The full model state in fp32 from a checkpoint of any ZeRO stage and any worker count.

    Parameters are the optimizer's fp32 masters (``full_state.safetensors``, read with no unpickling);
    for a bf16/fp16 run these differ from the module's low-precision weights. A checkpoint without that
    file (written before it existed) is refused: its DeepSpeed files are pickles, and mim-scale loads none.
    """
    from mim_scale.engine import full_state

    if not (Path(ckpt_dir) / full_state.FILE).is_file():
        raise FileNotFoundError(
            f"{ckpt_dir}: no {full_state.FILE}; the rest of this checkpoint is DeepSpeed pickles, which mim-scale "
            "does not load (they can run code). If you trust its origin, convert it yourself with DeepSpeed's "
            "zero_to_fp32.py and load the result as safetensors.")
    return full_state.master_weights(ckpt_dir)
