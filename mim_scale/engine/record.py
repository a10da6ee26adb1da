"""What a training worker records about each step: the step's metrics record (what the launcher, the history
and TensorBoard read), Prometheus series, ``history.jsonl`` and the log line (rank 0), TensorBoard, and the
reconstruction and loss-curve pictures. One :class:`StepRecorder` per worker."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from mim_scale.config import Config
from mim_scale.engine.checkpoint import TrainState
from mim_scale.engine.step import StepResult
from mim_scale.fileutil import read_jsonl
from mim_scale.metrics.mfu import compute_mfu, run_peak_flops
from mim_scale.recipe import Recipe
from mim_scale.rundir import HISTORY_FILE, PICTURES_DIR, RunFiles, targets_file
from mim_scale.tensorboard import open_board

log = logging.getLogger("mim_scale.train")


class StepRecorder:
    """Records every step of one worker. ``t_start``: when the worker started (time to the first step)."""

    def __init__(self, cfg: Config, run_dir: Path, files: RunFiles, rank: int, state: TrainState, recipe: Recipe,
                 device: torch.device, t_start: float):
        from mim_scale.model import flops_per_sample

        self.cfg, self.run_dir, self.files, self.rank, self.recipe = cfg, Path(run_dir), files, rank, recipe
        self.flops_per_crop = flops_per_sample(cfg)
        self.peak_flops = run_peak_flops(cfg.metrics.device_peak_flops, cfg.train.precision, device)
        self.t_start = t_start
        self.time_to_first_step_s: float | None = None
        self.metrics = _start_metrics(cfg, files, self.run_dir.name, rank, state.restarts)
        # RUN/tensorboard/ (rank 0, when installed); a resumed run's board hides the steps it repeats
        self.board = open_board(cfg.metrics.tensorboard, run_dir, rank, resumed_at=state.step)
        if rank == 0:
            files.truncate_torn_tail(HISTORY_FILE)  # a rank 0 killed mid-append left half a line

    def step_record(self, step: StepResult, losses: dict[str, float], state: TrainState, engine, scheduler,
                    corrupt_skipped: int) -> dict[str, Any]:
        """The step's metrics record: counts with units in their names, timing, lr, grad norm, MFU, losses."""
        if self.time_to_first_step_s is None:
            self.time_to_first_step_s = time.perf_counter() - self.t_start
        grad_norm = engine.get_global_grad_norm()
        return {"step": state.step, "samples_seen": state.samples_seen, "crops_seen": state.samples_seen,
                "volumes_seen": state.volumes_seen, "views_seen": state.views_seen, "tokens_seen": state.tokens_seen,
                "crops_per_step": self.recipe.crops_per_step,
                "lr": scheduler.get_last_lr()[0] if scheduler is not None else 0.0,
                "step_seconds": step.step_seconds, "data_wait_seconds": step.data_wait_seconds,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "mfu": compute_mfu(self.flops_per_crop, step.crops, step.step_seconds, self.peak_flops),
                "time_to_first_step_s": self.time_to_first_step_s, "corrupt_skipped": corrupt_skipped,
                "data_digest": step.data_digest, **losses}

    def validation(self, record: dict[str, Any], step: int, source: str) -> None:
        if self.metrics is not None:
            self.metrics.record_validation(step, {k: v for k, v in record.items() if k.startswith("val_")},
                                           source=source)

    def record(self, record: dict[str, Any], step: StepResult, losses: dict[str, float], save_now: bool) -> None:
        """Prometheus (every rank), history line and log line (rank 0, every ``train.log_every`` steps and at
        saves), TensorBoard (rank 0)."""
        cfg = self.cfg
        if self.metrics is not None:
            self.metrics.record_step(
                step=record["step"], step_seconds=step.step_seconds, data_wait_seconds=step.data_wait_seconds,
                crops=step.crops, views=step.views, volumes=step.volume_reads, tokens=step.tokens,
                losses={k: v for k, v in losses.items() if k.startswith(("rec_", "align_", "total"))},
                lr=record["lr"], grad_norm=record["grad_norm"], mfu=record["mfu"],
                collapse_std={k: v for k, v in losses.items() if k.startswith("z_std")})
            self.metrics.record_device_memory()
        if self.rank == 0 and (record["step"] % cfg.train.log_every == 0 or save_now):
            self.files.append_line(HISTORY_FILE, json.dumps({k: v for k, v in record.items()
                                                             if v is not None and k != "data_digest"}))
            log.info("step %d/%d total %.4f (%s) %.2fs/step, data wait %.2fs", record["step"], cfg.train.steps,
                     losses.get("total", math.nan), ", ".join(f"{k} {v:.3f}" for k, v in losses.items()
                                                              if k.startswith(("rec", "align"))),
                     step.step_seconds, step.data_wait_seconds)
        if self.board is not None:
            self.board.step(record)

    def pictures(self, model, crops: torch.Tensor, step: int, save_now: bool) -> None:
        """Every ``train.pictures_every`` steps (else at each checkpoint)."""
        every = self.cfg.train.pictures_every
        if (step % every == 0) if every else save_now:
            _write_pictures(self.cfg, model, crops, self.run_dir, step, self.rank, self.board)

    def checkpoint(self, seconds: float, nbytes: int) -> None:
        if self.metrics is not None:
            self.metrics.record_checkpoint(seconds, nbytes)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.metrics is not None:
            time.sleep(self.cfg.metrics.linger_seconds)  # a last scrape sees the final step
            self.metrics.close()


def _start_metrics(cfg: Config, files: RunFiles, run: str, rank: int, restarts: int):
    """Serve this rank's /metrics on ``metrics.addr`` (the launcher resolved "auto" to the Ray node's IP) and
    send its file_sd entry to the run folder (``prometheus_targets/rank-N.json``, :mod:`mim_scale.rundir`)."""
    if not cfg.metrics.enabled:
        return None
    from mim_scale.metrics import TrainMetrics, file_sd_text, write_file_sd

    metrics = TrainMetrics.from_config(cfg.metrics, run, rank)
    metrics.set_restarts(restarts)
    labels = {"run": run, "rank": str(rank)}
    files.write_text(targets_file(rank), file_sd_text([{"targets": [metrics.target], "labels": labels}]))
    if cfg.metrics.targets_file:  # a copy for an operator's own Prometheus, in a folder every node shares
        write_file_sd(Path(cfg.metrics.targets_file) / f"rank-{rank}.json", [metrics.target], labels)
    log.info("rank %d serves metrics on http://%s/metrics", rank, metrics.target)
    return metrics


def _write_pictures(cfg: Config, model, crops: torch.Tensor, run_dir: Path, step: int, rank: int,
                    board=None) -> None:
    """Reconstruction and loss-curve PNGs beside the run, written by rank 0 (and the reconstruction to
    TensorBoard). Under ZeRO-3 a forward gathers parameters collectively, so every rank runs it; otherwise the
    other ranks skip it."""
    if rank != 0 and cfg.train.zero_stage != 3:
        return
    try:
        from mim_scale.pictures import method_reconstruction, save_loss_curves_png, save_method_png, zero_losses_for_run
    except ImportError:
        return
    pictures = Path(run_dir) / PICTURES_DIR
    pictures.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    with torch.no_grad():  # one chain of views with tissue in it, from this step's crops (one forward)
        picture = method_reconstruction(model, crops, seed=cfg.train.seed)
    model.train(was_training)
    if rank != 0:
        return
    title = f"{Path(run_dir).name} step {step}"
    png = save_method_png(picture, pictures / f"reconstruction_step{step:07d}.png", title=title)
    save_method_png(picture, pictures / "reconstruction_latest.png", title=title)
    if board is not None:
        board.image("reconstruction", png, step)
    history_path = Path(run_dir) / HISTORY_FILE
    if history_path.is_file():
        history = read_jsonl(history_path)  # to the last complete line
        save_loss_curves_png(history, pictures / "loss_curves.png", zeros=zero_losses_for_run(cfg, run_dir))
