"""Geometry of the level views, on a coordinate-encoded crop (each voxel holds its own index)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mim_scale.config import load_config
from mim_scale.model.views import draw_masks, make_views


def coordinate_crop(b: int, s: int) -> torch.Tensor:
    """(b, 1, s, s, s) float64, voxel (i, j, k) of crop n holds n*s^3 + i*s^2 + j*s + k."""
    return torch.arange(b * s**3, dtype=torch.float64).reshape(b, 1, s, s, s)


def decode(value: float, s: int) -> tuple[int, int, int, int]:
    v = int(round(value))
    return v // s**3, (v // s**2) % s, (v // s) % s, v % s


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_level_views_geometry(name):
    cfg = load_config(name)
    m = cfg.model
    v, p, g, length = m.view_size, m.patch_size, m.grid, m.num_tokens
    s = 2 * v
    b = 2
    crops = coordinate_crop(b, s)
    gen = torch.Generator().manual_seed(3)
    l1, l2, l3 = make_views(crops, m, cfg.masking, gen)

    # level 1: trilinear halving of a linear ramp is the 2x2x2 mean: value at (2i+0.5, 2j+0.5, 2k+0.5)
    i = torch.arange(v, dtype=torch.float64) * 2 + 0.5
    expect = (torch.arange(b, dtype=torch.float64)[:, None, None, None] * s**3 + i[:, None, None] * s**2
              + i[None, :, None] * s + i[None, None, :])
    torch.testing.assert_close(l1.x[:, 0], expect, rtol=0, atol=1e-6)

    # level-1 mask: whole octants, built here from token coordinates independently
    k_oct = round(8 * cfg.masking.level1_ratio)
    masked_octants = {}
    for n in range(b):
        octs = set()
        for t in range(length):
            td, th, tw = t // (g * g), (t // g) % g, t % g
            o = (td // (g // 2), th // (g // 2), tw // (g // 2))
            if l1.mask[n, t] == 1:
                octs.add(o)
        assert len(octs) == k_oct
        for t in range(length):
            td, th, tw = t // (g * g), (t // g) % g, t % g
            o = (td // (g // 2), th // (g // 2), tw // (g // 2))
            assert (l1.mask[n, t] == 1) == (o in octs), "level-1 masks are not whole spatial octants"
        masked_octants[n] = octs
    assert int(l1.mask.sum()) == b * k_oct * length // 8
    assert l1.ids_keep.shape == (b, length - k_oct * length // 8)

    # level 2: corners decode to the origins of exactly the masked octants; content is the full-res block
    assert l2.num_views == b * k_oct
    seen = {n: set() for n in range(b)}
    for row in range(l2.num_views):
        n, d0, h0, w0 = decode(float(l2.x[row, 0, 0, 0, 0]), s)
        assert d0 % v == 0 and h0 % v == 0 and w0 % v == 0
        seen[n].add((d0 // v, h0 // v, w0 // v))
        assert int(l2.crop_index[row]) == n
        torch.testing.assert_close(l2.x[row], crops[n, :, d0:d0 + v, h0:h0 + v, w0:w0 + v], rtol=0, atol=0)
    assert seen == masked_octants

    keep2 = math.floor(length * (1 - cfg.masking.level2_ratio))
    keep3 = math.floor(length * (1 - cfg.masking.level3_ratio))
    assert l2.ids_keep.shape == (l2.num_views, keep2)
    assert torch.all(l2.mask.sum(1) == length - keep2)
    assert l3.ids_keep.shape == (l3.num_views, keep3)
    assert torch.all(l3.mask.sum(1) == length - keep3)
    if name == "base":  # the spec's integer counts
        assert (l1.num_keep, keep2, length - keep2, keep3) == (108, 86, 130, 108)

    # level 3: each view is F.interpolate of the independently indexed (masked) level-2 patch
    picks = cfg.masking.level3_picks
    assert l3.num_views == l2.num_views * picks
    for row in range(l3.num_views):
        parent, token = int(l3.parent[row]), int(l3.token[row])
        assert parent == row // picks
        assert l2.mask[parent, token] == 1, "level-3 views must come from masked level-2 patches"
        td, th, tw = token // (g * g), (token // g) % g, token % g
        patch = l2.x[parent:parent + 1, :, td * p:(td + 1) * p, th * p:(th + 1) * p, tw * p:(tw + 1) * p]
        want = F.interpolate(patch, size=(v, v, v), mode="trilinear", align_corners=False)
        torch.testing.assert_close(l3.x[row:row + 1], want, rtol=0, atol=0)
    for parent in range(l2.num_views):
        chosen = l3.token[parent * picks:(parent + 1) * picks].tolist()
        assert len(set(chosen)) == picks


def test_views_masks_follow_the_generator():
    cfg = load_config("tiny")
    crops = torch.rand(2, 1, 64, 64, 64)
    a = make_views(crops, cfg.model, cfg.masking, torch.Generator().manual_seed(5))
    b = make_views(crops, cfg.model, cfg.masking, torch.Generator().manual_seed(5))
    c = make_views(crops, cfg.model, cfg.masking, torch.Generator().manual_seed(6))
    for la, lb in zip(a, b):
        assert torch.equal(la.mask, lb.mask) and torch.equal(la.x, lb.x)
    assert any(not torch.equal(la.mask, lc.mask) for la, lc in zip(a, c))


def test_plain_mae_is_one_randomly_masked_level():
    cfg = load_config("tiny", ["masking.levels=1"])
    crops = torch.rand(3, 1, 64, 64, 64)
    (l1,) = make_views(crops, cfg.model, cfg.masking, torch.Generator().manual_seed(0))
    length = cfg.model.num_tokens
    keep = math.floor(length * (1 - cfg.masking.level1_ratio))
    assert l1.ids_keep.shape == (3, keep)
    assert torch.all(l1.mask.sum(1) == length - keep)
    torch.testing.assert_close(l1.x, F.avg_pool3d(crops, 2))


def test_saved_draw_reproduces_views():
    cfg = load_config("tiny")
    crops = torch.rand(2, 1, 64, 64, 64)
    draw = draw_masks(2, cfg.model, cfg.masking, "cpu", torch.Generator().manual_seed(1))
    a = make_views(crops, cfg.model, cfg.masking, draw=draw)
    b = make_views(crops, cfg.model, cfg.masking, torch.Generator().manual_seed(1))
    for la, lb in zip(a, b):
        assert torch.equal(la.ids_keep, lb.ids_keep) and torch.equal(la.x, lb.x)


def test_bad_crop_shape_is_named():
    cfg = load_config("tiny")
    with pytest.raises(ValueError, match=r"crops must be \(B, 1, 64, 64, 64\)"):
        make_views(torch.rand(1, 1, 32, 32, 32), cfg.model, cfg.masking)


def test_octant_ids_cover_all_eight():
    # every octant is reachable: over many draws each of the 8 is masked at least once
    cfg = load_config("tiny")
    draw = draw_masks(64, cfg.model, cfg.masking, "cpu", torch.Generator().manual_seed(0))
    assert set(draw.octants.flatten().tolist()) == set(range(8))
    assert list(itertools.islice(draw.octants.shape, 2)) == [64, 4]
