"""A worker's start: join the process group, resolve the recipe for this world size, build the model in its
DeepSpeed engine, and the state to continue from (a fresh run, the latest checkpoint at the same layout, or a
checkpoint resharded to another worker count)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from mim_scale.config import Config
from mim_scale.engine import checkpoint as ckpt
from mim_scale.engine.deepspeed_engine import build_engine, build_model, cpu_mmap_threshold_bytes, init_distributed
from mim_scale.engine.reporter import Reporter
from mim_scale.engine.step import mask_seed
from mim_scale.recipe import Recipe
from mim_scale.rundir import ATTEMPTS_FILE, RECIPE_FILE, RunFiles

log = logging.getLogger("mim_scale.train")


def join_process_group(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device) after joining the group RANK/WORLD_SIZE/MASTER_ADDR describe (NCCL on GPUs)."""
    use_gpu = cfg.launch.use_gpu and torch.cuda.is_available()
    init_distributed(use_gpu, cpu_mmap_threshold_bytes(cfg))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    return rank, world, device


def resolve_recipe(cfg: Config, world: int, files: RunFiles, rank: int) -> tuple[Config, Recipe]:
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


def build(cfg: Config, world: int, init_weights: Path | None = None):
    """The MiM model (alignment BatchNorms synchronised over ranks; encoder from ``init_weights`` when given;
    under ZeRO-3 built sharded: :func:`deepspeed_engine.build_model`) in its DeepSpeed engine ->
    (engine, scheduler)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, world, init_weights)
    engine, _optimizer, scheduler = build_engine(cfg, model, world)
    return engine, scheduler


def start_state(engine, scheduler, cfg: Config, reporter: Reporter, rank: int, world: int) -> ckpt.TrainState:
    """The state this start continues from: the reporter's latest checkpoint if there is one, else a fresh one;
    its restart count also counts starts that failed before the first checkpoint."""
    state = ckpt.TrainState(world_size=world, micro_batch=cfg.train.micro_batch, grad_accum=cfg.train.grad_accum,
                            stream_seed=cfg.data.seed, config=cfg.to_dict())
    reporter.cleanup_scratch(rank)
    _barrier()  # no rank writes into a scratch folder before stale ones are gone
    resume_from = reporter.resume_dir()
    if resume_from is not None:
        saved = ckpt.load(engine, resume_from, rank=rank, world_size=world, scheduler=scheduler)
        state = continue_state(saved, state, cfg, world)
        log.info("rank %d resumed from %s at step %d (%d samples seen)", rank, resume_from, state.step,
                 state.samples_seen)
    state.restarts = max(state.restarts, _count_attempt(reporter.files, rank))
    return state


def continue_state(saved: ckpt.TrainState, fresh: ckpt.TrainState, cfg: Config, world: int) -> ckpt.TrainState:
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
