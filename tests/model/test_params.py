"""Parameter counts of every shipped size (large and huge on the meta device) and the FLOPs count."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mim_scale.config import load_config
from mim_scale.model import build_model, flops_per_sample, forward_flops


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_model(name):
    with torch.device("meta"):
        return build_model(load_config(name))


def test_base_matches_the_paper_size():
    model = _meta_model("base")
    assert _count(model.encoder) == pytest.approx(34e6, rel=0.05)
    assert _count(model) == pytest.approx(71e6, rel=0.05)
    assert _count(model.decoder) == pytest.approx(35e6, rel=0.05)
    assert _count(model.align_12) + _count(model.align_23) == pytest.approx(3e6, rel=0.15)


@pytest.mark.parametrize("name, total", [("large", 300e6), ("huge", 1e9)])
def test_large_and_huge_build_on_the_meta_device(name, total):
    model = _meta_model(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert _count(model) == pytest.approx(total, rel=0.05)
    assert model.encoder.activation_checkpointing


def test_analytic_flops_match_a_traced_count():
    # the analytic count against torch's FLOP counter on a real tiny forward (matmuls, convs, attention)
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    crops = torch.rand(1, 1, 64, 64, 64)
    with FlopCounterMode(display=False) as counter:
        model(crops, generator=torch.Generator().manual_seed(0))
    traced = counter.get_total_flops()
    analytic = sum(forward_flops(cfg).values())
    assert analytic == pytest.approx(traced, rel=0.03)
    assert flops_per_sample(cfg) == pytest.approx(3 * analytic)


def test_flops_scale_with_levels():
    mim = flops_per_sample(load_config("base"))
    mae = flops_per_sample(load_config("base", ["masking.levels=1"]))
    assert 15 < mim / mae < 25  # 21 views against 1, the MAE view a little cheaper per token
    assert mim == pytest.approx(2.47e12, rel=0.02)  # the figure quoted in the model notes
