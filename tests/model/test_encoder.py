"""The hybrid encoder: no leak from masked voxels, dense features for fine-tuning, key schema."""

from __future__ import annotations

import re

import pytest
import torch

from mim_scale.config import load_config
from mim_scale.model import HybridEncoder, build_encoder, build_model
from mim_scale.model.encoder import token_keep_mask
from mim_scale.model.ops import upsample_token_mask
from mim_scale.model.views import random_mask

# tiny (3 stages, patch 8) and a 4-stage backbone like base's (patch 16), both small
CONFIGS = {
    "tiny": [],
    "four_stage": ["model.widths=[8, 8, 16, 24]", "model.conv_depths=[1, 1, 2]", "model.view_size=32",
                   "data.crop_size=64", "model.encoder_heads=4", "model.encoder_depth=1", "masking.level3_picks=2"],
}


def _setup(overrides, seed=0):
    cfg = load_config("tiny", overrides)
    torch.manual_seed(seed)
    enc = HybridEncoder(cfg.model).double()
    # non-zero biases everywhere, so a leak cannot hide behind zero-initialised parameters
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    n, v, g = 2, cfg.model.view_size, cfg.model.grid
    x = torch.rand(n, 1, v, v, v, dtype=torch.float64)
    ids_keep, mask = random_mask(n, g**3, g**3 // 2, "cpu", torch.Generator().manual_seed(seed))
    return cfg, enc, x, ids_keep, mask


def _visible_stage_outputs(enc, x, ids_keep):
    keep = token_keep_mask(ids_keep, None, enc.grid**3)
    feats = enc.conv_features(x, keep)
    outs = []
    for f in feats:
        vox = upsample_token_mask(keep, enc.grid, f.shape[1]).permute(0, 2, 3, 4, 1).bool()
        outs.append(f[vox.expand_as(f)])
    return outs, enc.forward_masked(x, ids_keep)


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_masked_voxels_do_not_leak_into_visible_tokens(which):
    cfg, enc, x, ids_keep, mask = _setup(CONFIGS[which])
    keep_vox = upsample_token_mask(1 - mask, cfg.model.grid, cfg.model.view_size).to(x.dtype)
    with torch.no_grad():
        stages_a, out_a = _visible_stage_outputs(enc, x, ids_keep)
        x_changed = x * keep_vox + (1 - keep_vox) * (torch.rand_like(x) * 50 - 25)  # only masked voxels differ
        assert not torch.equal(x, x_changed)
        stages_b, out_b = _visible_stage_outputs(enc, x_changed, ids_keep)
    for a, b in zip(stages_a, stages_b):  # every conv stage, at visible positions
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-10)  # transformer + fusion + norm


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_a_visible_voxel_does_change_the_output(which):
    # the control: the no-leak test above is not passing because nothing reaches the output
    cfg, enc, x, ids_keep, mask = _setup(CONFIGS[which])
    g, p = cfg.model.grid, cfg.model.patch_size
    t = int(ids_keep[0, 0])
    td, th, tw = t // (g * g), (t // g) % g, t % g
    x2 = x.clone()
    x2[0, 0, td * p + 1, th * p + 1, tw * p + 1] += 1.0
    with torch.no_grad():
        stages_a, out_a = _visible_stage_outputs(enc, x, ids_keep)
        stages_b, out_b = _visible_stage_outputs(enc, x2, ids_keep)
    for a, b in zip(stages_a, stages_b):
        assert (a - b).abs().max() > 1e-6
    assert (out_a[0, 0] - out_b[0, 0]).abs().max() > 1e-6
    torch.testing.assert_close(out_a[1], out_b[1], rtol=0, atol=0)  # the other sample is untouched


def test_forward_features_shapes_and_non_cubic_input():
    cfg = load_config("tiny")
    enc = build_encoder(cfg.model).eval()
    feats = enc.forward_features(torch.rand(2, 1, 32, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16, 16), (2, 32, 8, 8, 8), (2, 64, 4, 4, 4)]
    feats = enc.forward_features(torch.rand(1, 1, 48, 32, 16), fuse=True)
    assert tuple(feats[-1].shape) == (1, 64, 6, 4, 2)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        enc.forward_features(torch.rand(1, 1, 30, 32, 32))


def test_dense_features_equal_masked_path_with_nothing_masked():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    enc = build_encoder(cfg.model).double().eval()
    x = torch.rand(2, 1, 32, 32, 32, dtype=torch.float64)
    all_ids = torch.arange(cfg.model.num_tokens).expand(2, -1)
    with torch.no_grad():
        masked = enc.forward_masked(x, all_ids)
        dense = enc.forward_features(x, fuse=True)[-1].flatten(2).transpose(1, 2)
    torch.testing.assert_close(masked, dense)


KEY_PATTERNS = [
    r"stages\.\d+\.embed\.(proj|norm)\.(weight|bias)",
    r"stages\.\d+\.blocks\.\d+\.(norm1|pw1|dw|pw2|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    r"token_embed\.(proj|norm)\.(weight|bias)",
    r"token_proj\.(weight|bias)",
    r"blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    r"fusion\.\d+\.(weight|bias)",
    r"norm\.(weight|bias)",
]


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_state_dict_follows_the_documented_key_schema(name):
    cfg = load_config(name)
    with torch.device("meta"):
        model = build_model(cfg)
    keys = list(model.encoder.state_dict())
    unmatched = [k for k in keys if not any(re.fullmatch(p, k) for p in KEY_PATTERNS)]
    assert unmatched == []
    n = len(cfg.model.widths)
    assert {f"fusion.{i}.weight" for i in range(n - 1)} <= set(keys)
    assert sum(1 for k in keys if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", k)) == cfg.model.encoder_depth
    # the encoder alone, built from the model config, loads the pre-training encoder strictly
    fresh = HybridEncoder(cfg.model) if name == "tiny" else None
    if fresh is not None:
        fresh.load_state_dict(build_model(cfg).encoder.state_dict(), strict=True)


def test_encoder_rejects_bad_config_and_input():
    with pytest.raises(TypeError, match="ModelConfig"):
        HybridEncoder(load_config("tiny"))
    enc = build_encoder(load_config("tiny").model)
    with pytest.raises(ValueError, match=r"encoder input must be \(N, 1, 32, 32, 32\)"):
        enc.forward_masked(torch.rand(1, 1, 16, 16, 16), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_sparse_conv_path_equals_the_dense_masked_path(which):
    # visible-voxel-only conv blocks against ConvMAE's dense "multiply by the mask" form
    cfg, enc, x, ids_keep, mask = _setup(CONFIGS[which])
    enc.sparse_conv = True
    stages_sparse, out_sparse = _visible_stage_outputs(enc, x, ids_keep)
    out_sparse.sum().backward()
    grads_sparse = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad()
    enc.sparse_conv = False
    stages_dense, out_dense = _visible_stage_outputs(enc, x, ids_keep)
    out_dense.sum().backward()
    for a, b in zip(stages_sparse, stages_dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(out_sparse, out_dense, rtol=0, atol=1e-10)
    for n, p in enc.named_parameters():
        if p.grad is not None or n in grads_sparse:
            torch.testing.assert_close(grads_sparse[n], p.grad, rtol=1e-9, atol=1e-10, msg=n)
