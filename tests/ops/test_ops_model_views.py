"""The fused view kernel reproduces the model's own views (mim_scale.model.views), so the model can call it."""

from __future__ import annotations

import pytest
import torch

from mim_scale import ops
from mim_scale.ops import parity

model_views = pytest.importorskip("mim_scale.model.views")
pytestmark = pytest.mark.skipif(not ops.triton_available(), reason="needs triton")


def test_fused_views_equal_the_model_views(ct_source):
    from mim_scale.config import load_config

    cfg = load_config("tiny")
    crops = parity.crops(ct_source, 1, cfg.model.in_channels, (cfg.data.crop_size,) * 3, seed=7)
    draw = model_views.draw_masks(1, cfg.model, cfg.masking, None, torch.Generator().manual_seed(0))
    levels = model_views.make_views(crops, cfg.model, cfg.masking, draw=draw)
    b, k = draw.octants.shape
    from mim_scale.ops import views

    fused = views.fused(crops, draw.octants, draw.token3.view(b, k, -1), cfg.model.patch_size)
    assert len(levels) == 3
    for got, lv in zip(fused, levels):
        assert got.shape == lv.x.shape
        assert torch.allclose(got, lv.x, atol=1e-6, rtol=0)
