"""Where a training worker sends metrics and checkpoints: :class:`Reporter` keeps checkpoints in a local run
folder (``mim_scale.engine.local``, ``torchrun``); the Ray launcher subclasses it (``launcher/ray_train.py``).
Every name inside the run folder comes from :mod:`mim_scale.rundir`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mim_scale.engine import checkpoint as ckpt
from mim_scale.rundir import (CHECKPOINTS_DIR, SCRATCH_SUFFIX, STOP_FILE, RunFiles, checkpoint_name,
                              checkpoint_scratch_name)


class Reporter:
    """Where a worker sends metrics and checkpoints. The base class keeps checkpoints in a local folder."""

    def __init__(self, run_dir: Path, keep_last: int = 2, files: RunFiles | None = None):
        self.run_dir = Path(run_dir)
        # targets, history, attempts: written into the driver's run folder (mim_scale.rundir), not this disk
        self.files = files if files is not None else RunFiles(run_dir)
        self.keep_last = keep_last

    def resume_dir(self) -> Path | None:
        try:
            return ckpt.latest_checkpoint(self.run_dir / CHECKPOINTS_DIR)
        except FileNotFoundError:
            return None

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None, rank: int) -> None:
        if ckpt_dir is not None and rank == 0:
            final = self.run_dir / checkpoint_name(metrics["step"])
            ckpt.commit_local(ckpt_dir, final, self.keep_last)

    def stop_requested(self) -> bool:
        """True once an operator asked the run to stop (``mim-scale stop``); checked every step, and agreed
        across ranks like a SIGTERM: the run saves a checkpoint and ends."""
        return (self.run_dir / STOP_FILE).exists()

    def cleanup_scratch(self, rank: int) -> None:
        """Before anything is written (every rank calls this, then a barrier): rank 0 removes scratch
        folders a killed run left behind, so a new save never mixes with stale files."""
        if rank != 0:
            return
        for stale in (self.run_dir / CHECKPOINTS_DIR).glob(f"step_*{SCRATCH_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)

    def scratch_dir(self, step: int) -> Path:
        path = self.run_dir / checkpoint_scratch_name(step)
        path.mkdir(parents=True, exist_ok=True)
        return path
