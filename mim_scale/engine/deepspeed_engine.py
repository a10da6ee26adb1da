"""The DeepSpeed engine around the single-device MiM model: ZeRO stage, precision, accumulation,
clipping, AdamW with decay-free biases and norms, and a per-step warm-up + cosine schedule.

The model never sees torch.distributed: DeepSpeed applies data parallelism and ZeRO from outside.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mim_scale.config import Config
from mim_scale.model.optim import param_groups, warmup_cosine  # the AdamW groups and schedule every trainer shares


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
            z.update({"stage3_param_persistence_threshold": 1e4, "stage3_gather_16bit_weights_on_model_save": False})
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


def init_distributed(use_gpu: bool) -> None:
    """Join (or create) the process group: NCCL on GPU, gloo on CPU. Reuses one Ray Train created."""
    import deepspeed

    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)


def input_dtype(cfg: Config) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
