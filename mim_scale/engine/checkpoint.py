"""Training checkpoints: a DeepSpeed checkpoint directory plus ``state.json``.

Layout of one checkpoint directory (what ``ray.train.report`` persists, or what the local writer renames
into place)::

    state.json              step, samples/tokens seen, stream position, config, version, restarts,
                            scheduler position (written last: its presence marks a complete checkpoint)
    rng-rank<r>.json        each rank's torch / numpy / python RNG states
    full_state.safetensors  fp32 masters + AdamW moments per parameter (see ``full_state``): export and
                            resume on another worker count
    mim/                    DeepSpeed's tag folder: model states (rank 0) + ZeRO optimizer shards (every rank)
    latest                  DeepSpeed's pointer to the tag

Atomicity: ranks write into ``step_N.tmp`` (or a Ray scratch folder), ``state.json`` is written by rank 0
after every rank's files (the full-state gather is a collective that follows each rank's DeepSpeed save),
then the folder is renamed into place. A crash at any point leaves the previous checkpoint complete.

``state.json`` is plain JSON: nothing in it is unpickled. Consolidating to fp32 for export goes through
DeepSpeed's own reader of its own files (those contain pickled Python objects written by this run; only
checkpoints of runs you trust should be exported: foundation checkpoints handed to others are safetensors).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mim_scale
from mim_scale.fileutil import write_atomic

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
        write_atomic(ckpt_dir / STATE_FILE, state.to_json())
    return _dir_bytes(ckpt_dir)


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
    """Restore model, optimizer, scheduler and RNG into ``engine``; return the saved :class:`TrainState`.

    Same worker count: DeepSpeed's own checkpoint (exact). Another worker count: the full fp32 state is
    scattered onto the new layout (:func:`full_state.restore`) and the schedule is moved to the saved step.
    """
    from mim_scale.engine import full_state

    state = TrainState.read(ckpt_dir)
    if world_size is None or world_size == state.world_size:
        load_path, _client = engine.load_checkpoint(str(ckpt_dir), tag=TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"{ckpt_dir}: DeepSpeed found no checkpoint under tag {TAG!r}")
        rng_file = Path(ckpt_dir) / f"rng-rank{rank}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        return state
    full_state.restore(engine, ckpt_dir)
    if scheduler is not None:
        epoch = state.scheduler_epoch or state.step
        scheduler.last_epoch = epoch
        lrs = [base * fn(epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
        for group, lr in zip(engine.optimizer.param_groups, lrs):
            group["lr"] = lr
    return state


def commit_local(tmp_dir: Path, final_dir: Path, keep_last: int) -> None:
    """For runs outside Ray: rename a finished checkpoint into place and prune old ones."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    siblings = sorted((p for p in final_dir.parent.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                      key=lambda p: int(p.name.split("_")[1]))
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
    for a bf16/fp16 run these differ from the module's low-precision weights. Checkpoints written before
    that file existed fall back to DeepSpeed's readers.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mim_scale.engine import full_state

    if (Path(ckpt_dir) / full_state.FILE).is_file():
        return full_state.master_weights(ckpt_dir)
    state = TrainState.read(ckpt_dir)
    stage = int(state.config.get("train", {}).get("zero_stage", 0))
    if stage == 0:
        # Without ZeRO (fp32 or bf16 optimizer) the model states file holds the module weights.
        path = Path(ckpt_dir) / TAG / "mp_rank_00_model_states.pt"
        blob = torch.load(path, map_location="cpu", weights_only=False)  # our own run's file; see module doc
        return {k: v.float() for k, v in blob["module"].items()}
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=TAG)
    return {k: v.float() for k, v in sd.items()}
