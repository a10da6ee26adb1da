"""`large` (304M parameters) trains under ZeRO-3 on 2 CPU ranks with the engine as shipped: 32^3 views of
64^3 real-CT crops (the full 96^3-view step needs a GPU), bf16, activation checkpointing; the checkpoint
consolidates to the whole model and loads strictly. 4 crops per optimizer step (2 micro-steps per rank: the
accumulation path under ZeRO-3; the shipped 128 would be 64 micro-steps a step). Outside CI: 196 s on 2 idle
cores (2026-12-03; ~4 GB per rank by the ZeRO memory bench in engine/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mim_scale.config import load_config
from mim_scale.engine import checkpoint as ckpt
from mim_scale.engine.local import launch_local, step_log


@pytest.mark.slow
def test_large_trains_under_zero3_on_two_cpu_ranks(engine_shards, tmp_path):
    cfg = load_config("large", [f"data.shards={engine_shards}", "data.crop_size=64", "model.view_size=32",
                                "data.num_workers=1", "train.global_batch_crops=4", "train.steps=3",
                                "train.warmup_steps=1", "train.lr=1e-4",
                                "train.checkpoint_every=0", "train.validate_every=3", "train.validation_crops=1",
                                "metrics.enabled=false"])
    assert cfg.train.zero_stage == 3 and cfg.model.activation_checkpointing
    results = launch_local(cfg, tmp_path / "run", workers=2)
    assert [r["step"] for r in results] == [3, 3]
    log = step_log(tmp_path / "run")
    assert len(log) == 3 and all(np.isfinite([r["total"] for r in log]))
    assert np.isfinite(results[0]["val_rec_l3"])  # the validation pass: a collective forward under ZeRO-3
    full = ckpt.consolidated_state_dict(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert sum(v.numel() for v in full.values()) == pytest.approx(303.7e6, rel=0.01)
    with torch.device("meta"):
        from mim_scale.model import build_model

        model = build_model(cfg)
    model.load_state_dict(full, strict=True, assign=True)
