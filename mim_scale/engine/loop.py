"""The per-worker training loop: stream -> MiM model in a DeepSpeed engine -> metrics and checkpoints.

It runs inside each Ray Train worker (see ``mim_scale.launcher``), or under ``torchrun``/``deepspeed``
with the process group already described by RANK/WORLD_SIZE/MASTER_ADDR. What differs between those is
only the :class:`Reporter` (how checkpoints and metrics leave the worker).

Save decisions (every N steps, every M minutes, on SIGTERM) are agreed by all ranks at a step boundary:
a timer or a signal fires on one rank only, and the save is collective, so each step the ranks
all-reduce (MAX) a small flag vector before deciding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mim_scale.config import Config
from mim_scale.engine import checkpoint as ckpt
from mim_scale.engine.collectives import agree_max, sum_over_ranks
from mim_scale.rundir import (ATTEMPTS_FILE, CHECKPOINTS_DIR, HISTORY_FILE, RECIPE_FILE, STOP_FILE, RunFiles,
                              targets_file)
from mim_scale.fileutil import read_jsonl
from mim_scale.metrics.mfu import compute_mfu, run_peak_flops
from mim_scale.engine.deepspeed_engine import build_engine, init_distributed
from mim_scale.engine.sync_bn import convert_sync_batchnorm
from mim_scale.tensorboard import open_board

log = logging.getLogger("mim_scale.train")


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
            final = self.run_dir / CHECKPOINTS_DIR / f"step_{metrics['step']:09d}"
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
        import shutil

        for stale in (self.run_dir / CHECKPOINTS_DIR).glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def scratch_dir(self, step: int) -> Path:
        path = self.run_dir / CHECKPOINTS_DIR / f"step_{step:09d}.tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class StepClock:
    """Seconds spent waiting for data versus computing, per optimizer step."""

    data_wait: float = 0.0
    start: float = 0.0

    def begin(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def mask_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the masks drawn at (step, micro-step, rank): resume reproduces them with no saved RNG."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _StopFlags:
    """SIGTERM sets a flag (on whichever rank receives it); the ranks agree on it at the next step."""

    def __init__(self):
        self.sigterm = False
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not in the main thread (some launchers): no signal-driven save
            pass

    def _on_sigterm(self, *_):
        self.sigterm = True


def parse_drill(spec: str | None, actions: tuple[str, ...], what: str = "fault") -> tuple[str, int, int] | None:
    """A failure drill ``"ACTION:RANK:STEP"`` with ACTION one of ``actions`` -> (action, rank, step)."""
    if not spec:
        return None
    try:
        action, rank, step = spec.split(":")
        if action not in actions:
            raise ValueError(action)
        return action, int(rank), int(step)
    except ValueError as exc:
        forms = " or ".join(f"{a}:RANK:STEP" for a in actions)
        raise ValueError(f"{what} {spec!r} must look like {forms}") from exc


def parse_fault(spec: str | None) -> tuple[str, int, int] | None:
    """A fault to inject, for failure drills: ``"raise:RANK:STEP"`` or ``"kill:RANK:STEP"``.

    The fault fires once per run, when that rank starts that step: ``raise`` raises an exception,
    ``kill`` SIGKILLs the worker process.
    """
    return parse_drill(spec, ("raise", "kill"), "fault spec")


def _inject(fault: tuple[str, int, int] | None, rank: int, step: int, restarts: int, run_dir: Path) -> None:
    if fault is None or restarts > 0 or (fault[1], fault[2]) != (rank, step):
        return
    # once per run, also when it fires before the first checkpoint (then the restart count stays 0)
    marker = Path(run_dir) / f".fault-fired-{fault[0]}-{rank}-{step}"
    if marker.exists():
        return
    marker.touch()
    log.warning("rank %d: injecting fault %r at step %d", rank, fault[0], step)
    if fault[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault on rank {rank} at step {step}")


def run_training(cfg: Config, *, run_dir: Path, reporter: Reporter, init_weights: Path | None = None,
                 on_step: Callable[[dict], None] | None = None, fault: str | None = None) -> dict[str, Any]:
    """Train for ``cfg.train.steps`` optimizer steps, resuming from the reporter's latest checkpoint.

    Returns the last step's metrics. Every rank must call this. ``fault``: see :func:`parse_fault`.
    """
    fault_spec = parse_fault(fault)
    from mim_scale.data.stream import make_loader, manifest_shards
    from mim_scale.data.window import hu_window
    from mim_scale.model import build_model, flops_per_sample

    t_start = time.perf_counter()
    use_gpu = cfg.launch.use_gpu and torch.cuda.is_available()
    init_distributed(use_gpu)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    cfg, recipe = _resolve_recipe(cfg, world, reporter.files, rank)

    model = convert_sync_batchnorm(build_model(cfg))  # the alignment MLPs' BatchNorms see every rank's pairs
    if init_weights is not None:
        from mim_scale.model.io import load_encoder_weights

        load_encoder_weights(model.encoder, init_weights)
    engine, _optimizer, scheduler = build_engine(cfg, model, world)

    state = ckpt.TrainState(world_size=world, micro_batch=cfg.train.micro_batch, grad_accum=cfg.train.grad_accum,
                            stream_seed=cfg.data.seed, config=cfg.to_dict())
    reporter.cleanup_scratch(rank)
    if dist.is_initialized():
        dist.barrier()  # no rank writes into a scratch folder before stale ones are gone
    resume_from = reporter.resume_dir()
    if resume_from is not None:
        saved = ckpt.load(engine, resume_from, rank=rank, world_size=world, scheduler=scheduler)
        state = _continue_state(saved, state, cfg, world)
        log.info("rank %d resumed from %s at step %d (%d samples seen)", rank, resume_from, state.step,
                 state.samples_seen)
    # a failure before the first checkpoint restarts from scratch: count attempts in the run folder too
    state.restarts = max(state.restarts, _count_attempt(reporter.files, rank))

    metrics = _start_metrics(cfg, reporter.files, Path(run_dir).name, rank, state.restarts)
    # RUN/tensorboard/ (rank 0, when installed); a resumed run's board hides the steps it repeats
    board = open_board(cfg.metrics.tensorboard, run_dir, rank, resumed_at=state.step)
    shards = manifest_shards(cfg.data)
    loader = make_loader(cfg.data, shards, rank=rank, world_size=world, batch_size=cfg.train.micro_batch,
                         batches_consumed=state.batches_consumed_per_rank, seed=state.stream_seed)
    batches = iter(loader)
    flops = flops_per_sample(cfg)
    peak_flops = run_peak_flops(cfg.metrics.device_peak_flops, cfg.train.precision, device)
    stop = _StopFlags()
    clock = StepClock()
    last_save_time = time.monotonic()
    history_path = Path(run_dir) / "history.jsonl"
    if rank == 0:
        reporter.files.truncate_torn_tail(HISTORY_FILE)  # a rank 0 killed mid-append left half a line
    result: dict[str, Any] = {"step": state.step}
    first_step_logged = False
    vset = None
    if cfg.train.validate_every:
        from mim_scale.engine.validate import load_or_draw_validation_set

        vset = load_or_draw_validation_set(cfg, Path(run_dir), rank)
    corrupt_seen: dict[int, int] = {}
    corrupt_here = 0  # corrupt samples this rank skipped since the last checkpoint
    corrupt_total = 0  # ... since this process started

    while state.step < cfg.train.steps:
        _inject(fault_spec, rank, state.step + 1, state.restarts, run_dir)
        clock.begin()
        sums: dict[str, float] = {}
        volumes = 0
        tokens = 0
        views = 0
        digest = hashlib.sha256()
        for micro in range(cfg.train.grad_accum):
            t_wait = time.perf_counter()
            batch = next(batches)
            clock.data_wait += time.perf_counter() - t_wait
            for m in batch["meta"]:
                volumes += m["crop_index"] == 0
                new = m["corrupt"] - corrupt_seen.get(m["worker"], 0)
                if new > 0:
                    corrupt_here += new
                    corrupt_total += new
                    if metrics is not None:
                        metrics.record_corrupt_skipped(new, m["shard"])
                corrupt_seen[m["worker"]] = m["corrupt"]
                digest.update(f"{m['shard']}/{m['key']}/{m['pick']}/{m['crop_index']};".encode())
            # int16 HU crosses to the device (half the bytes), the HU window runs there: float32 crops, since
            # the views and reconstruction targets are cut from them; the model casts only the encoder's input
            # to the engine's dtype (bf16 steps of ~8 HU would blur level-3 targets)
            crops = hu_window(batch["crop"].to(device=device, non_blocking=True), cfg.data.hu_min, cfg.data.hu_max)
            generator = torch.Generator(device=device).manual_seed(mask_seed(cfg.train.seed, state.step, micro, rank))
            out = engine(crops, generator=generator, progress=state.step / cfg.train.steps)
            engine.backward(out["total"])
            engine.step()
            state.batches_consumed_per_rank += 1
            for key, value in out.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    sums[key] = sums.get(key, 0.0) + float(value.detach().float())
            # the model reports tokens and views per crop; a micro-batch holds micro_batch crops
            tokens += round(float(out["tokens"]) * crops.shape[0]) if "tokens" in out else 0
            views += round(float(out["views"]) * crops.shape[0]) if "views" in out else 0
        state.step += 1
        losses = {k: v / cfg.train.grad_accum for k, v in sums.items()}
        # one all-reduce per step: counts summed over ranks, collapse monitors averaged over them
        monitors = sorted(k for k in losses if k.startswith(("z_std", "zraw_std")))
        totals = sum_over_ranks([tokens, views, volumes] + [losses[k] for k in monitors], device)
        losses.update({k: totals[3 + i] / world for i, k in enumerate(monitors)})
        state.samples_seen += cfg.train.micro_batch * cfg.train.grad_accum * world  # crops
        state.tokens_seen += round(totals[0])
        state.views_seen += round(totals[1])
        state.volumes_seen += round(totals[2])
        step_seconds = clock.elapsed
        if not first_step_logged:
            result["time_to_first_step_s"] = time.perf_counter() - t_start
            first_step_logged = True

        # one collective per step: loss finiteness, time- and signal-driven save requests
        due_time = cfg.train.checkpoint_minutes > 0 and time.monotonic() - last_save_time >= 60 * cfg.train.checkpoint_minutes
        agreed = agree_max([float(due_time), float(stop.sigterm or reporter.stop_requested()),
                         float(not all(map(_finite, losses.values())))], device)
        save_now = (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0) \
            or agreed[0] > 0 or agreed[1] > 0 or state.step == cfg.train.steps
        grad_norm = engine.get_global_grad_norm()
        lr = scheduler.get_last_lr()[0] if scheduler is not None else 0.0
        mfu = compute_mfu(flops, cfg.train.micro_batch * cfg.train.grad_accum, step_seconds, peak_flops)
        result = {"step": state.step, "samples_seen": state.samples_seen, "crops_seen": state.samples_seen,
                  "volumes_seen": state.volumes_seen, "views_seen": state.views_seen, "tokens_seen": state.tokens_seen,
                  "crops_per_step": recipe.crops_per_step, "lr": lr, "step_seconds": step_seconds,
                  "data_wait_seconds": clock.data_wait, "grad_norm": _to_float(grad_norm), "mfu": mfu,
                  "time_to_first_step_s": result.get("time_to_first_step_s"), "corrupt_skipped": corrupt_total,
                  "data_digest": digest.hexdigest()[:16], **losses}
        if vset is not None and (state.step % cfg.train.validate_every == 0 or state.step == cfg.train.steps):
            from mim_scale.engine.validate import evaluate

            result.update(evaluate(engine.module, vset))  # every rank: ZeRO-3 forwards are collective
            result["validation_set"] = vset.source  # "held-out" or "seen"
            if metrics is not None:
                metrics.record_validation(state.step, {k: v for k, v in result.items() if k.startswith("val_")},
                                          source=vset.source)
        if metrics is not None:
            metrics.record_step(step=state.step, step_seconds=step_seconds, data_wait_seconds=clock.data_wait,
                                crops=cfg.train.micro_batch * cfg.train.grad_accum, views=views,
                                volumes=volumes,
                                tokens=tokens, losses={k: v for k, v in losses.items() if k.startswith(("rec_", "align_", "total"))},
                                lr=lr, grad_norm=_to_float(grad_norm), mfu=mfu,
                                collapse_std={k: v for k, v in losses.items() if k.startswith("z_std")})
            metrics.record_device_memory()
        if rank == 0 and (state.step % cfg.train.log_every == 0 or save_now):
            reporter.files.append_line(HISTORY_FILE, json.dumps({k: v for k, v in result.items()
                                                                 if v is not None and k != "data_digest"}))
            log.info("step %d/%d total %.4f (%s) %.2fs/step, data wait %.2fs", state.step, cfg.train.steps,
                     losses.get("total", float("nan")), ", ".join(f"{k} {v:.3f}" for k, v in losses.items()
                                                                  if k.startswith(("rec", "align"))),
                     step_seconds, clock.data_wait)
        if on_step is not None:
            on_step(result)
        if board is not None:
            board.step(result)
        if agreed[2] > 0:
            raise FloatingPointError(f"non-finite loss at step {state.step} on some rank: {losses}")

        pictures_due = state.step % cfg.train.pictures_every == 0 if cfg.train.pictures_every else save_now
        if pictures_due:
            _write_pictures(cfg, engine.module, crops, run_dir, state.step, history_path, rank, board)
        if save_now:
            state.losses = {k: v for k, v in losses.items() if _finite(v)}
            state.scheduler_epoch = int(scheduler.last_epoch) if scheduler is not None else state.step
            state.corrupt_skipped += int(sum_over_ranks([corrupt_here], device)[0])
            corrupt_here = 0
            t_save = time.perf_counter()
            scratch = reporter.scratch_dir(state.step)
            nbytes = ckpt.save(engine, scratch, state, rank)
            save_seconds = time.perf_counter() - t_save
            if metrics is not None:
                metrics.record_checkpoint(save_seconds, nbytes)
            reporter.report(result, scratch, rank)
            last_save_time = time.monotonic()
            if agreed[1] > 0:
                log.warning("rank %d: SIGTERM received; checkpoint at step %d saved, stopping", rank, state.step)
                break
    if board is not None:
        board.close()
    if metrics is not None:
        time.sleep(cfg.metrics.linger_seconds)
        metrics.close()
    return result


def _resolve_recipe(cfg: Config, world: int, files: RunFiles, rank: int):
    """The config with this world size's batch, lr and schedule written in (:mod:`mim_scale.recipe`, the code
    ``mim-scale plan`` prints from); rank 0 logs it and records it as ``RUN/recipe.json``."""
    from mim_scale.recipe import apply, resolve, training_volume_count

    recipe = resolve(cfg, world, training_volume_count(cfg))
    if rank == 0:
        log.info("recipe: %d workers x micro-batch %d crops x %d accumulation = %d crops per step, peak lr %.3g "
                 "(%s), warm-up %d of %d steps", recipe.workers, recipe.micro_batch_crops, recipe.grad_accum,
                 recipe.crops_per_step, recipe.peak_lr, recipe.lr_rule, recipe.warmup_steps, recipe.total_steps)
        files.write_text(RECIPE_FILE, json.dumps(recipe.as_dict(), indent=1))  # the driver's run folder
    return apply(cfg, recipe), recipe


def _count_attempt(files: RunFiles, rank: int) -> int:
    """How many times this run started before (every rank gets the same number; rank 0 records this start)."""
    _barrier()
    previous = int(files.read_text(ATTEMPTS_FILE) or 0)
    _barrier()
    if rank == 0:
        files.write_text(ATTEMPTS_FILE, str(previous + 1))
    return previous


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _continue_state(saved: ckpt.TrainState, fresh: ckpt.TrainState, cfg: Config, world: int) -> ckpt.TrainState:
    """The state to continue from. Same layout: the stream continues exactly. Another worker count: the
    global batch must stay the same, and the stream restarts on a new seed at the samples already seen."""
    saved.restarts += 1
    saved.config = cfg.to_dict()
    if saved.world_size == world and saved.micro_batch == cfg.train.micro_batch:
        return saved
    new_global = world * cfg.train.micro_batch * cfg.train.grad_accum
    if new_global != saved.global_batch:
        raise ValueError(f"resuming on {world} workers changes the global batch from {saved.global_batch} to "
                         f"{new_global}: set train.grad_accum / train.micro_batch so that workers x micro_batch x "
                         f"grad_accum = {saved.global_batch}")
    saved.world_size, saved.micro_batch, saved.grad_accum = world, cfg.train.micro_batch, cfg.train.grad_accum
    saved.stream_seed = int(mask_seed(saved.stream_seed, saved.samples_seen, 0, 0) % (2**31))
    saved.batches_consumed_per_rank = 0
    return saved


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def _to_float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


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


def _write_pictures(cfg: Config, model, crops: torch.Tensor, run_dir: Path, step: int, history_path: Path,
                    rank: int, board=None) -> None:
    """Reconstruction and loss-curve PNGs beside the run (``train.pictures_every`` steps, else at each
    checkpoint), written by rank 0 (and the reconstruction to TensorBoard). Under ZeRO-3 a forward gathers
    parameters collectively, so every rank runs it; otherwise the other ranks skip it."""
    if rank != 0 and cfg.train.zero_stage != 3:
        return
    try:
        from mim_scale.pictures import method_reconstruction, save_loss_curves_png, save_method_png, zero_losses_for_run
    except ImportError:
        return
    pictures = Path(run_dir) / "pictures"
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
    if history_path.is_file():
        history = read_jsonl(history_path)  # to the last complete line
        save_loss_curves_png(history, pictures / "loss_curves.png", zeros=zero_losses_for_run(cfg, run_dir))


def configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("MIM_SCALE_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def scratch_root() -> Path:
    return Path(tempfile.gettempdir())
