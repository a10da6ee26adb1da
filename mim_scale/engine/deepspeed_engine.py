"""The DeepSpeed engine around the single-device MiM model: ZeRO stage, precision, accumulation,
clipping, AdamW with decay-free biases and norms, and a per-step warm-up + cosine schedule.

The model never sees torch.distributed: DeepSpeed applies data parallelism and ZeRO from outside.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from mim_scale.config import Config
from mim_scale.model.optim import param_groups, warmup_cosine  # the AdamW groups and schedule every trainer shares

log = logging.getLogger(__name__)


def effective_lr(cfg: Config) -> float:
    """The peak lr (:func:`mim_scale.recipe.peak_lr`: ``train.lr``, else base_lr x global batch / 256)."""
    from mim_scale.recipe import peak_lr

    return peak_lr(cfg)[0]


def lr_multiplier(step: int, cfg: Config, peak_lr: float) -> float:
    """Linear warm-up over ``warmup_steps``, then half-cosine down to ``min_lr`` at ``steps``
    (:func:`mim_scale.model.optim.warmup_cosine`).

    Returned as a multiplier of the peak lr (what LambdaLR wants); ``step`` counts optimizer steps.
    """
    t = cfg.train
    return warmup_cosine(step, t.warmup_steps, t.steps, low=min(1.0, t.min_lr / peak_lr))


# ZeRO-3 settings that keep every rank's memory at its share of the model (measured: engine/README.md, Memory).
# DeepSpeed's defaults assume a GPU with room to spare and keep whole-model transients:
# - stage3_max_reuse_distance / max_live_parameters (1e9 numel each): once the trace of the first step is
#   recorded, a gathered parameter whose next use is within 1e9 elements is not released, i.e. a model under
#   1e9 parameters stays gathered whole from its forward through its backward on every rank;
# - sub_group_size (1e9): the optimizer step casts the whole partition's gradients to a fresh fp32 copy and
#   AdamW adds partition-sized temporaries on top, all at once; in sub-groups of 1e7 elements they stay small.
# Smaller live / reuse windows cost re-gathers (communication), not results.
ZERO3_MEMORY: dict[str, float] = {
    "stage3_max_live_parameters": 3e7,
    "stage3_max_reuse_distance": 3e7,
    "stage3_prefetch_bucket_size": 1e7,
    "sub_group_size": 1e7,
    "reduce_bucket_size": 2e7,
}


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    from mim_scale.recipe import grad_accum_for

    t = cfg.train
    accum = grad_accum_for(cfg, world_size)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch * accum * world_size,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,  # our own logging and metrics report progress
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": t.zero_stage},
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if t.zero_stage >= 1:
        z = ds["zero_optimization"]
        z.update({"overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 5e7})
        if t.zero_stage == 3:
            z.update({"stage3_param_persistence_threshold": 1e4, "stage3_gather_16bit_weights_on_model_save": False,
                      **ZERO3_MEMORY})
        if t.offload_optimizer:
            z["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.launch.use_gpu}
            if not (cfg.launch.use_gpu and torch.cuda.is_available()):
                # on CPU the optimizer already runs where offload would put it: keep torch's AdamW rather
                # than JIT-compiling DeepSpeedCPUAdam (~1 min) for no gain
                ds["zero_force_ds_cpu_optimizer"] = False
    elif t.offload_optimizer:
        raise ValueError("train.offload_optimizer needs train.zero_stage >= 1 (ZeRO partitions what is offloaded)")
    return ds


def make_optimizer(cfg: Config, model: torch.nn.Module, lr: float, on_gpu: bool) -> torch.optim.Optimizer:
    """torch's AdamW on CPU (compiles nothing); DeepSpeed's fused (or CPU-offload) Adam on GPU."""
    groups = param_groups(model, cfg.train.weight_decay)
    betas = tuple(cfg.train.betas)
    if on_gpu and cfg.train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    if on_gpu:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def build_model(cfg: Config, world_size: int, init_weights=None) -> torch.nn.Module:
    """The MiM model for the engine: alignment BatchNorms synchronised over ranks (:mod:`.sync_bn`), the encoder
    from an export when ``init_weights`` is given.

    Under ZeRO-3 it is built inside ``deepspeed.zero.Init``: each module's parameters are cut into this rank's
    shard as soon as its constructor returns (the model initialises its weights inside constructors for this),
    so no rank ever holds the whole model; ``init_weights`` are then loaded with the encoder gathered.
    Call after :func:`init_distributed`; the parameters are created from torch's RNG as without ZeRO-3.
    """
    from mim_scale.engine.sync_bn import convert_sync_batchnorm
    from mim_scale.model import build_model as build_mim

    if cfg.train.zero_stage == 3:
        import deepspeed

        # convert_sync_batchnorm inside too: the SyncBatchNorm1d replacing each BatchNorm1d is built sharded
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world_size)):
            model = convert_sync_batchnorm(build_mim(cfg))
    else:
        model = convert_sync_batchnorm(build_mim(cfg))
    if init_weights is not None:
        from mim_scale.model.io import load_encoder_weights

        if cfg.train.zero_stage == 3:
            import deepspeed

            # whole on every rank for the load, rank 0's values re-sharded on exit (once, before any optimizer state)
            with deepspeed.zero.GatheredParameters(list(model.encoder.parameters()), modifier_rank=0):
                load_encoder_weights(model.encoder, init_weights)
        else:
            load_encoder_weights(model.encoder, init_weights)
    return model


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine; returns (engine, optimizer, lr_scheduler)."""
    import deepspeed

    on_gpu = cfg.launch.use_gpu and torch.cuda.is_available()
    lr = effective_lr(cfg)
    optimizer = make_optimizer(cfg, model, lr, on_gpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg, lr))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size),
        dist_init_required=False)
    return engine, optimizer, scheduler


def init_distributed(use_gpu: bool, mmap_threshold_bytes: int = 0) -> bool:
    """Join (or create) the process group: NCCL on GPU, gloo on CPU. Reuses one Ray Train created.

    On CPU, a ``mmap_threshold_bytes`` > 0 fixes glibc's mmap threshold first (:func:`set_mmap_threshold`;
    :func:`cpu_mmap_threshold_bytes` gives the config's value). Returns whether it was fixed."""
    import deepspeed

    fixed = False
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if mmap_threshold_bytes > 0:
            fixed = set_mmap_threshold(mmap_threshold_bytes)
            log.info("glibc mmap threshold: %s", f"fixed at {mmap_threshold_bytes / 2**20:g} MiB" if fixed else
                     "left as it is (MALLOC_MMAP_THRESHOLD_ in the environment, or not glibc)")
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)
    return fixed


# glibc's mmap threshold for a ZeRO-3 training process on CPU when the config says "auto" (see set_mmap_threshold)
ZERO3_CPU_MMAP_THRESHOLD_MIB = 4


def cpu_mmap_threshold_bytes(cfg: Config) -> int:
    """The glibc mmap threshold a CPU training process of ``cfg`` runs with, bytes; 0 = glibc's own (dynamic).

    ``train.cpu_mmap_threshold_mib``: < 0 (auto) fixes it at :data:`ZERO3_CPU_MMAP_THRESHOLD_MIB` under ZeRO-3,
    whose point is memory, and leaves glibc's default otherwise (ZeRO-0/1/2 gain nothing from it and pay for
    it in step time: engine/README.md, ZeRO memory)."""
    mib = cfg.train.cpu_mmap_threshold_mib
    if mib < 0:
        mib = ZERO3_CPU_MMAP_THRESHOLD_MIB if cfg.train.zero_stage == 3 else 0
    return int(mib * 2**20)


def set_mmap_threshold(threshold_bytes: int) -> bool:
    """Have glibc serve every allocation of ``threshold_bytes`` or more with its own mmap, returned to the system
    when freed. Returns whether the setting was applied. For the whole process, and for good: once set, glibc's
    dynamic threshold stays off.

    Why: by default glibc raises its mmap threshold to the size of each mmapped block freed (up to 32 MiB), so
    after the first few frees tensors of up to 32 MiB come from the heap, and a heap only shrinks from its top.
    A ZeRO-3 process on CPU frees and re-allocates such tensors all the time (it gathers and releases every
    parameter, twice a step), and the holes stay resident: measured on ``large`` (2 ranks,
    benchmarks/zero_memory.py, engine/README.md "ZeRO memory"), peak RSS ~5.1 GiB per rank for 3.1 GiB of live
    tensors by default, ~3.6 GiB with a 1 MiB threshold and ~3.8 GiB with 4 MiB. The price is CPU time: every
    allocation above the threshold is a fresh mapping, faulted in page by page (ZeRO-0 steps 2.5x slower at
    1 MiB, where it saves nothing). A threshold the operator set (``MALLOC_MMAP_THRESHOLD_`` in the
    environment) is left as it is; not glibc (musl, macOS): nothing changes.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h>; setting it also turns glibc's dynamic threshold off
    return bool(mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(int(threshold_bytes))))


def input_dtype(cfg: Config) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
