"""The CPU-friendly depthwise conv and row gather against PyTorch's own ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mim_scale.model.layers import DepthwiseConv3d, gather_rows, sincos_pos_embed_3d


@pytest.mark.parametrize("n", [1, 3])
def test_depthwise_conv_gradients_match_native(n):
    torch.manual_seed(0)
    conv = DepthwiseConv3d(6, 5).double()
    x = torch.randn(n, 6, 9, 8, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    g = torch.randn(n, 6, 9, 8, 7, dtype=torch.float64)
    conv(x).backward(g)
    ours = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = None
    w = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    F.conv3d(x, w, b, padding=2, groups=6).backward(g)
    for a, ref in zip(ours, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, ref)


def test_depthwise_conv_under_bf16_autocast():
    torch.manual_seed(0)
    conv = DepthwiseConv3d(4, 3)
    x = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref_w = conv.weight.detach().clone().requires_grad_(True)
    F.conv3d(x.detach(), ref_w, conv.bias.detach(), padding=1, groups=4).sum().backward()
    torch.testing.assert_close(conv.weight.grad, ref_w.grad, rtol=0.05, atol=0.5)
    with torch.no_grad():  # inference uses the plain conv
        torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias, padding=1, groups=4))


def test_gather_rows_gradient():
    flat = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 4, 5, 9])
    g = torch.randn(4, 3, dtype=torch.float64)
    gather_rows(flat, idx).backward(g)
    expect = torch.zeros(10, 3, dtype=torch.float64)
    expect[idx] = g
    torch.testing.assert_close(flat.grad, expect)


def test_sincos_pos_embed_is_fixed_and_distinct():
    pe = sincos_pos_embed_3d(6, 64)
    assert pe.shape == (216, 64)
    assert torch.all(pe[:, 60:] == 0)  # 64 = 3 axes x 20 channels + 4 zero channels
    assert torch.unique(pe, dim=0).shape[0] == 216  # every token gets its own code
    torch.testing.assert_close(pe, sincos_pos_embed_3d(6, 64))


def test_init_happens_in_each_leaf_constructor():
    # ZeRO-3 (deepspeed.zero.Init) partitions a module's parameters as soon as its constructor
    # returns, so the MAE init must happen there, not from a parent afterwards
    from mim_scale.config import load_config
    from mim_scale.model import build_model
    from mim_scale.model.layers import Conv3d, Linear

    torch.manual_seed(0)
    lin = Linear(300, 200)
    assert torch.all(lin.bias == 0)
    assert float(lin.weight.detach().std()) == pytest.approx((2 / 500) ** 0.5, rel=0.05)
    conv = Conv3d(8, 16, kernel_size=2, stride=2)
    assert torch.all(conv.bias == 0)
    model = build_model(load_config("tiny"))
    leaf_types = {type(m) for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False))}
    assert torch.nn.Linear not in leaf_types and torch.nn.Conv3d not in leaf_types  # only the self-initialising kinds
