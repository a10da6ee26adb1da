"""The view-construction references agree with the MiM geometry, on crops of the real CT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mim_scale.ops import parity, reference as R


@pytest.fixture
def crop(ct_source) -> torch.Tensor:
    return parity.crops(ct_source, 2, 1, (32, 32, 32), seed=3)  # S = 16


def test_downsample2x_is_the_2x2x2_block_mean(crop):
    assert torch.allclose(R.downsample2x(crop), F.avg_pool3d(crop, 2), atol=1e-6)


def test_octant_views_are_the_crop_octants(crop):
    octants = torch.tensor([[0, 5, 7], [3, 4, 6]])
    views = R.octant_views(crop, octants)
    assert views.shape == (6, 1, 16, 16, 16)
    for n in range(2):
        for k, o in enumerate(octants[n].tolist()):
            od, oh, ow = o // 4, (o // 2) % 2, o % 2
            want = crop[n, :, od * 16:(od + 1) * 16, oh * 16:(oh + 1) * 16, ow * 16:(ow + 1) * 16]
            assert torch.equal(views[n * 3 + k], want)


def test_octant_numbering_matches_the_level1_token_octants(crop):
    """Octant o of the crop is where the level-1 tokens of octant o of the token grid come from."""
    p, g = 4, 4  # level-1 view 16^3, 4^3 tokens, octants of 2^3 tokens
    v1 = R.downsample2x(crop)
    tokens = R.patchify(v1, p)  # (N, 64, 64)
    for o in range(8):
        od, oh, ow = o // 4, (o // 2) % 2, o % 2
        ids = [(d * g + h) * g + w for d in range(od * 2, od * 2 + 2) for h in range(oh * 2, oh * 2 + 2)
               for w in range(ow * 2, ow * 2 + 2)]
        octant_tokens = R.unpatchify(tokens[:, ids], p, (2, 2, 2))  # (N, 1, 8, 8, 8)
        assert torch.allclose(octant_tokens, R.downsample2x(R.octant_views(crop, torch.full((2, 1), o))), atol=1e-6)


def test_patch_views_upsample_the_picked_patch(crop):
    octants = torch.tensor([[2, 6], [1, 7]])
    picks = torch.tensor([[[0, 63], [21, 42]], [[5, 10], [60, 1]]])
    views = R.patch_views(crop, octants, picks, 4)
    assert views.shape == (8, 1, 16, 16, 16)
    level2 = R.octant_views(crop, octants)
    for n in range(2):
        for k in range(2):
            for j in range(2):
                t = int(picks[n, k, j])
                tz, ty, tx = t // 16, (t // 4) % 4, t % 4
                patch = level2[n * 2 + k:n * 2 + k + 1, :, tz * 4:tz * 4 + 4, ty * 4:ty * 4 + 4, tx * 4:tx * 4 + 4]
                want = F.interpolate(patch, size=(16, 16, 16), mode="trilinear", align_corners=False)[0]
                assert torch.equal(views[(n * 2 + k) * 2 + j], want)


def test_make_views_masks_zero_exactly_the_masked_tokens(crop):
    octants = torch.tensor([[1], [6]])
    picks = torch.tensor([[[3]], [[9]]])
    g = torch.Generator().manual_seed(0)
    masks = tuple((torch.rand((r, 64), generator=g) < 0.5).float() for r in (2, 2, 2))
    plain = R.make_views(crop, octants, picks, 4)
    masked = R.make_views(crop, octants, picks, 4, masks)
    for v, mv, m in zip(plain, masked, masks):
        pv, pm = R.patchify(v, 4), R.patchify(mv, 4)
        hidden = m.bool()
        assert torch.equal(pm[hidden], torch.zeros_like(pm[hidden]))
        assert torch.equal(pm[~hidden], pv[~hidden])
        assert pv[hidden].abs().sum() > 0  # the CT crop is not empty where the mask hid it


def test_make_views_rejects_bad_arguments(crop):
    with pytest.raises(ValueError, match="2 x a multiple of the patch size"):
        R.make_views(crop, torch.zeros((2, 1), dtype=torch.long), torch.zeros((2, 1, 1), dtype=torch.long), 5)
    with pytest.raises(ValueError, match="picks must be"):
        R.make_views(crop, torch.zeros((2, 2), dtype=torch.long), torch.zeros((2, 1, 1), dtype=torch.long), 4)
