"""The model reaches its masking ops through the one dispatcher (mim_scale.ops), and ``auto`` decides.

Issue 21's fault: ``auto`` enabled the fused view kernel on an H200, but the model cut its views with its own
torch code, so the kernel never ran. Here the view kernel must run exactly when the dispatcher enables it
(a measured win on the device, or backend ``triton``), the torch reference otherwise, with the same views.
"""

from __future__ import annotations

import pytest
import torch

from mim_scale import ops
from mim_scale.config import load_config
from mim_scale.model import build_model
from mim_scale.model.views import draw_masks, make_views
from mim_scale.ops import auto, parity
from mim_scale.ops import views as ops_views

needs_triton = pytest.mark.skipif(not ops.triton_available(), reason="needs triton")


@pytest.fixture(scope="module")
def tiny():
    # 32^3 crops (16^3 views): the view kernel runs in Triton's interpreter here, so keep it small
    return load_config("tiny", ["data.crop_size=32", "model.view_size=16"])


@pytest.fixture(scope="module")
def crops(tiny, ct_dir):
    source = parity.load_ct_source(ct_dir / "abdomen_pelvis_ct.nii.gz")
    return parity.crops(source, 1, tiny.model.in_channels, (tiny.data.crop_size,) * 3, seed=3)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls that reach the fused view kernel itself (not just the dispatcher's counter)."""
    seen = []
    real = ops_views.fused
    monkeypatch.setattr(ops_views, "fused", lambda *a, **k: seen.append(1) or real(*a, **k))
    return seen


def _views(tiny, crops, seed=0):
    draw = draw_masks(crops.shape[0], tiny.model, tiny.masking, None, torch.Generator().manual_seed(seed))
    return make_views(crops, tiny.model, tiny.masking, draw=draw)


def test_cpu_auto_takes_the_torch_views(tiny, crops, spy):
    ops.calls.clear()
    levels = _views(tiny, crops)
    assert [lv.x.shape[0] for lv in levels] == [1, 4, 16]
    assert spy == []
    assert ops.calls[("make_views", "reference")] == 1 and ops.calls[("make_views", "triton")] == 0


@needs_triton
def test_view_kernel_runs_when_a_measured_win_enables_it(tiny, crops, spy, monkeypatch):
    """The rule turns the kernel on for a pretend card named "cpu" whose figure wins by both margins."""
    want = _views(tiny, crops)
    monkeypatch.setitem(auto.MEASURED, "cpu", {"make_views": auto.Figure("fwd", 1.936, 1.2, "test")})
    assert ops.fused_enabled("make_views", crops)
    ops.calls.clear()
    got = _views(tiny, crops)
    assert spy == [1]
    assert ops.calls[("make_views", "triton")] == 1 and ops.calls[("make_views", "reference")] == 0
    for g, w in zip(got, want):
        assert torch.allclose(g.x, w.x, atol=1e-6, rtol=0)
        assert torch.equal(g.mask, w.mask) and torch.equal(g.ids_keep, w.ids_keep)


@needs_triton
def test_a_losing_figure_keeps_the_torch_views(tiny, crops, spy, monkeypatch):
    monkeypatch.setitem(auto.MEASURED, "cpu", {"make_views": auto.Figure("fwd", 1.2, 1.05, "test")})
    _views(tiny, crops)
    assert spy == []


def test_model_step_routes_views_loss_gather_scatter_through_ops(tiny, crops):
    """A whole step of the model asks the dispatcher for every one of these ops (torch path on CPU)."""
    torch.manual_seed(0)
    model = build_model(tiny)
    ops.calls.clear()
    with torch.no_grad():
        out = model(crops, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["total"])
    for op in ("make_views", "masked_norm_pix_mse", "gather_tokens", "scatter_tokens"):
        assert ops.calls[(op, "reference")] >= 1, (op, dict(ops.calls))
    assert not any(path == "triton" for (_, path) in ops.calls)


@needs_triton
def test_conv_block_fused_depthwise_matches_the_model_path():
    """The fused masked depthwise conv has ConvBlock's contract: forward and every gradient equal the default
    path (which `auto` keeps everywhere until a GPU figure says otherwise)."""
    from mim_scale.model.layers import ConvBlock

    torch.manual_seed(0)
    block = ConvBlock(6, 3, 2.0)
    x0 = torch.randn(2, 5, 4, 6, 6)
    keep = (torch.rand(2, 5, 4, 6, 1) < 0.4).float()
    results = []
    for backend in ("auto", "triton"):
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        ops.calls.clear()
        with ops.backend(backend):
            y = block(x, keep)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
        assert ops.calls[("masked_depthwise_conv3d", "triton")] == (1 if backend == "triton" else 0)
    (y_ref, gx_ref, gp_ref), (y, gx, gp) = results
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gx, gx_ref, atol=1e-5, rtol=1e-5)
    for name in gp_ref:
        assert torch.allclose(gp[name], gp_ref[name], atol=1e-5, rtol=1e-4), name
