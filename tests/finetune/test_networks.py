"""Segmentation / classification networks on the real tiny encoder: shapes, key ownership, lr groups."""

from __future__ import annotations

import pytest
import torch

from mim_scale.config import load_config
from mim_scale.finetune.networks import ClassificationNet, SegmentationNet
from mim_scale.finetune.optim import encoder_layer_ids, lr_at, param_groups
from mim_scale.model.encoder import build_encoder


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny").model


def test_segmentation_uses_all_skip_levels_plus_a_new_deeper_stage(tiny):
    torch.manual_seed(0)
    enc = build_encoder(tiny)
    net = SegmentationNet(enc, tiny.widths, out_channels=6)
    assert net.channels == (16, 32, 64, 128)  # the stages, then 2 x E at half the last grid
    x = torch.randn(2, 1, 32, 32, 32)
    feats = enc.forward_features(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16, 16), (32, 8, 8, 8), (64, 4, 4, 4)]
    assert tuple(net.deep(feats[-1]).shape[1:]) == (128, 2, 2, 2)
    assert net(x).shape == (2, 6, 32, 32, 32)
    # the encoder accepts any multiple of the patch size: non-cubic windows work too
    assert net(torch.randn(1, 1, 64, 48, 32)).shape == (1, 6, 64, 48, 32)


def test_the_encoder_part_of_the_state_dict_is_exactly_the_encoders(tiny):
    enc = build_encoder(tiny)
    net = SegmentationNet(enc, tiny.widths, out_channels=3)
    enc_keys = {k for k in net.state_dict() if k.startswith("encoder.")}
    assert enc_keys == {f"encoder.{k}" for k in enc.state_dict()}
    # an encoder state dict loads strictly into the network's encoder: zero missing, zero unexpected
    fresh = build_encoder(tiny)
    result = net.encoder.load_state_dict(fresh.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    new = [k for k in net.state_dict() if not k.startswith("encoder.")]
    assert any(k.startswith("deep.") for k in new) and any(k.startswith("up_blocks.") for k in new)


def test_segmentation_rejects_a_window_the_deep_stage_cannot_halve(tiny):
    net = SegmentationNet(build_encoder(tiny), tiny.widths, out_channels=3)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 40, 32, 32))  # a multiple of the patch size 8, not of 16


def test_classification_net(tiny):
    net = ClassificationNet(build_encoder(tiny), tiny.widths, num_classes=3, pooling="max", dropout=0.1)
    assert net(torch.randn(4, 1, 32, 32, 32)).shape == (4, 3)
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationNet(build_encoder(tiny), tiny.widths, num_classes=1)


def test_layer_wise_decay_scales_deeper_layers_less(tiny):
    net = SegmentationNet(build_encoder(tiny), tiny.widths, out_channels=3)
    ids, num_layers = encoder_layer_ids(net.encoder)
    # stages.0 < stages.1 < token_embed < blocks.0 < blocks.1 in registration (forward) order
    assert ids["stages.0.embed.proj.weight"] < ids["stages.1.embed.proj.weight"] < ids["token_embed.proj.weight"]
    assert ids["blocks.0.attn.qkv.weight"] < ids["blocks.1.attn.qkv.weight"] <= num_layers
    groups = param_groups(net, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["up_blocks.0.transp_conv.conv.weight"] == 1.0  # new modules train at the full rate
    assert scale["encoder.blocks.1.attn.qkv.weight"] == 0.5 ** (num_layers + 1 - ids["blocks.1.attn.qkv.weight"])
    assert scale["encoder.stages.0.embed.proj.weight"] < scale["encoder.blocks.1.attn.qkv.weight"] < 1.0
    assert decay["encoder.blocks.0.attn.qkv.bias"] == 0.0 and decay["encoder.blocks.0.attn.qkv.weight"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    flat = param_groups(net, weight_decay=0.05, layer_decay=1.0)
    assert {g["lr_scale"] for g in flat} == {1.0}


def test_warmup_then_cosine():
    assert lr_at(0, 1.0, 0.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 0.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 0.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
