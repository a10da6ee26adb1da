"""The DeepSpeed config and schedule derived from ours (no processes started)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from mim_scale.config import ConfigError, load_config
from mim_scale.engine.deepspeed_engine import (ZERO3_CPU_MMAP_THRESHOLD_MIB, cpu_mmap_threshold_bytes, deepspeed_config,
                                               effective_lr, lr_multiplier, param_groups)
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


def test_cpu_mmap_threshold_is_fixed_under_zero3_by_default():
    assert cpu_mmap_threshold_bytes(_cfg("train.zero_stage=3")) == ZERO3_CPU_MMAP_THRESHOLD_MIB * 2**20
    assert cpu_mmap_threshold_bytes(load_config("large")) == ZERO3_CPU_MMAP_THRESHOLD_MIB * 2**20
    for stage in (0, 1, 2):  # nothing to gain there, and the fresh mappings cost step time
        assert cpu_mmap_threshold_bytes(_cfg(f"train.zero_stage={stage}")) == 0
    assert cpu_mmap_threshold_bytes(_cfg("train.zero_stage=3", "train.cpu_mmap_threshold_mib=0")) == 0
    assert cpu_mmap_threshold_bytes(_cfg("train.cpu_mmap_threshold_mib=1")) == 2**20
    assert cpu_mmap_threshold_bytes(_cfg("train.cpu_mmap_threshold_mib=0.5")) == 2**19
    for bad in ("64", "-2", "-0.5", "0.01", "nan"):
        with pytest.raises(ConfigError, match="train.cpu_mmap_threshold_mib"):
            _cfg(f"train.cpu_mmap_threshold_mib={bad}")


# a process frees 2 MiB tensors after one freed 2 MiB mapping raised glibc's dynamic threshold: how much of
# what it freed stays resident (MiB), and whether set_mmap_threshold applied
_HEAP_PROBE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch

    from mim_scale.engine.deepspeed_engine import set_mmap_threshold

    def rss_mib():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    applied = set_mmap_threshold(1 << 20) if sys.argv[1] == "fixed" else None
    warm = torch.ones(2 << 18)
    del warm
    base = rss_mib()
    blocks = [torch.ones(2 << 18) for _ in range(200)]  # 400 MiB in 2 MiB tensors
    last = blocks[-1]  # the top of the heap stays in use: glibc cannot shrink the heap below it
    del blocks
    print(applied, rss_mib() - base)
""")


def _heap_probe(mode: str, **env: str) -> tuple[str, float]:
    # the allocator as glibc ships it: no tunables or preloaded allocator from the caller's environment
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")} | env
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], env=full_env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_fixed_mmap_threshold_returns_freed_tensors_to_the_system():
    # in a child process: the setting is for the whole process and for good
    applied, kept_default = _heap_probe("default")
    assert kept_default > 300  # glibc's default keeps the holes below the last block resident
    applied, kept_fixed = _heap_probe("fixed")
    assert applied == "True" and kept_fixed < 20
    applied, _ = _heap_probe("fixed", MALLOC_MMAP_THRESHOLD_="65536")
    assert applied == "False"  # an operator's own threshold stays
