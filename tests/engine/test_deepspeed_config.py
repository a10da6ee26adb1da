"""The DeepSpeed config and schedule derived from ours (no processes started)."""

from __future__ import annotations

import math

import pytest
import torch

from mim_scale.config import load_config
from mim_scale.engine.deepspeed_engine import deepspeed_config, effective_lr, lr_multiplier, param_groups
from mim_scale.model import build_model


def _cfg(*overrides):
    return load_config("tiny", ["model.view_size=16", "data.crop_size=32", *overrides])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_config_per_stage(stage):
    ds = deepspeed_config(_cfg(f"train.zero_stage={stage}", "train.grad_accum=3", "train.micro_batch=2",
                               "train.grad_clip=0.5", "launch.workers=4"), world_size=4)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 2 * 3 * 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}


def test_precisions_and_offload():
    assert deepspeed_config(_cfg("train.precision=fp16", "launch.use_gpu=true"), 1)["fp16"]["enabled"]
    assert "bf16" not in deepspeed_config(_cfg("train.precision=fp32"), 1)
    ds = deepspeed_config(_cfg("train.zero_stage=2", "train.offload_optimizer=true"), 2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # CPU run: torch's AdamW, nothing compiled
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        deepspeed_config(_cfg("train.zero_stage=0", "train.offload_optimizer=true"), 2)


def test_warmup_then_cosine():
    cfg = _cfg("train.steps=110", "train.warmup_steps=10", "train.lr=1e-3", "train.min_lr=1e-5")
    peak = effective_lr(cfg)
    assert peak == 1e-3
    m = [lr_multiplier(s, cfg, peak) for s in range(111)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert m[10] == pytest.approx(1.0) and m[60] == pytest.approx(0.01 + 0.99 * 0.5)
    assert m[110] * peak == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))
    # derived lr: base_lr x global batch / 256
    cfg = _cfg("train.lr=0", "train.base_lr=1.5e-4", "train.micro_batch=4", "train.grad_accum=2", "launch.workers=8")
    assert effective_lr(cfg) == pytest.approx(1.5e-4 * 64 / 256)


def test_no_decay_for_biases_and_norms():
    model = build_model(_cfg())
    groups = param_groups(model, 0.05)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        if p.ndim <= 1:
            assert id(p) not in decay, name
    assert decay and sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert math.isclose(max(g["weight_decay"] for g in groups), 0.05)
    assert torch.is_tensor(groups[0]["params"][0])
