"""Reconstruction loss and cross-level alignment, checked against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mim_scale.config import load_config
from mim_scale.model import build_model
from mim_scale.model.losses import AlignHead, alignment_loss, centred_z_std, rec_weights_at
from mim_scale.model.ops import masked_norm_pix_mse, norm_pix_target
from mim_scale.model.validation import load_ct_hu, random_crops



def coordinate_crop(b: int, s: int) -> torch.Tensor:
    """(b, 1, s, s, s) float64, voxel (i, j, k) of crop n holds n*s^3 + i*s^2 + j*s + k."""
    return torch.arange(b * s**3, dtype=torch.float64).reshape(b, 1, s, s, s)


def decode(value: float, s: int) -> tuple[int, int, int, int]:
    v = int(round(value))
    return v // s**3, (v // s**2) % s, (v // s) % s, v % s


@pytest.fixture(scope="module")
def ct_crops(ct_dir):
    vol = load_ct_hu(ct_dir / "abdomen_pelvis_ct.nii.gz")
    return random_crops(vol, 64, 2, np.random.default_rng(0))


def _tiny_step(crops, overrides=(), seed=0, dtype=torch.float64, **model_kw):
    cfg = load_config("tiny", list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg, **model_kw).to(dtype)
    out, aux = model.step(crops.to(dtype), generator=torch.Generator().manual_seed(seed))
    return cfg, model, out, aux


def test_visible_token_predictions_do_not_change_the_loss(ct_crops):
    cfg, model, out, aux = _tiny_step(ct_crops)
    p = cfg.model.patch_size
    for lv, (_, pred) in zip(aux["levels"], aux["results"]):
        base = masked_norm_pix_mse(pred, lv.x, lv.mask, p)
        torch.testing.assert_close(base, out[f"rec_l{lv.level}"])
        changed = pred + (1 - lv.mask)[..., None] * torch.randn_like(pred) * 10
        torch.testing.assert_close(masked_norm_pix_mse(changed, lv.x, lv.mask, p), base, rtol=0, atol=1e-12)
        # control: a masked token's prediction does change it
        moved = pred + lv.mask[..., None] * 0.5
        assert abs(float(masked_norm_pix_mse(moved, lv.x, lv.mask, p).detach() - base.detach())) > 1e-3


def test_normalisation_matches_a_direct_per_patch_computation(ct_crops):
    cfg = load_config("tiny")
    p, g = cfg.model.patch_size, cfg.model.grid
    x = torch.nn.functional.avg_pool3d(ct_crops.double(), 2)  # a real level-1 view
    target = norm_pix_target(x, p, 1e-6)
    pred = torch.randn_like(target)
    mask = torch.zeros(x.shape[0], g**3, dtype=torch.float64)
    mask[:, ::3] = 1
    errs = []
    for n in range(x.shape[0]):
        for t in range(g**3):
            td, th, tw = t // (g * g), (t // g) % g, t % g
            patch = x[n, 0, td * p:(td + 1) * p, th * p:(th + 1) * p, tw * p:(tw + 1) * p].reshape(-1)
            mean = patch.mean()
            var = ((patch - mean) ** 2).mean()
            direct = (patch - mean) / math.sqrt(float(var) + 1e-6)
            # the target is computed in float32 (the ops convention); compare at that precision
            torch.testing.assert_close(target[n, t].double(), direct, rtol=1e-5, atol=1e-5)
            if mask[n, t]:
                errs.append(float(((pred[n, t] - direct) ** 2).mean()))
    assert abs(float(masked_norm_pix_mse(pred, x, mask, p)) - sum(errs) / len(errs)) < 1e-5


def test_alignment_stops_gradient_on_the_parent_side(ct_crops):
    for variant in ("simsiam", "reference"):
        _, model, out, aux = _tiny_step(ct_crops, [f"loss.align_variant=\"{variant}\""])
        (f1, _), (f2, _), (f3, _) = aux["results"]
        # align_12: parent = level-1 features, child = level-2
        g_parent, g_child = torch.autograd.grad(out["align_12"], [f1, f2], allow_unused=True, retain_graph=True)
        assert g_parent is None or float(g_parent.abs().max()) == 0.0
        assert g_child is not None and float(g_child.abs().max()) > 0
        g_parent, g_child = torch.autograd.grad(out["align_23"], [f2, f3], allow_unused=True, retain_graph=True)
        assert g_parent is None or float(g_parent.abs().max()) == 0.0
        assert g_child is not None and float(g_child.abs().max()) > 0


def test_simsiam_is_the_default_and_projector_learns_only_from_the_child():
    assert load_config("tiny").loss.align_variant == "simsiam"
    torch.manual_seed(0)
    head = AlignHead(16).double()
    parent = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    child = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    loss, _ = alignment_loss(parent, child, head)
    loss.backward()
    assert parent.grad is None
    # z = stop_grad(g(parent)): the same loss with an explicitly frozen copy of z gives the same grads
    z = head.projector(parent).detach()
    p = head.predictor(head.projector(child))
    manual = (2 - 2 * torch.nn.functional.cosine_similarity(p, z, dim=-1)).mean()
    torch.testing.assert_close(loss, manual)


def test_parents_are_the_regions_the_children_came_from():
    cfg = load_config("tiny")
    m = cfg.model
    v, p, g, s = m.view_size, m.patch_size, m.grid, 2 * m.view_size
    crops = coordinate_crop(2, s) / (2 * s**3)  # coordinates, scaled into [0, 1]
    _, model, out, aux = _tiny_step(crops)
    l1, l2, l3 = aux["levels"]
    (f1, _), (f2, _), (f3, _) = aux["results"]
    parent12, child12 = model.align_pairs_12(aux["levels"], aux["results"])
    parent23, child23 = model.align_pairs_23(aux["levels"], aux["results"])

    origins = []
    for row in range(l2.num_views):
        n, d0, h0, w0 = decode(float(l2.x[row, 0, 0, 0, 0]) * 2 * s**3, s)
        origins.append((n, d0, h0, w0))
        # level-1 tokens of that octant: the level-1 grid covers the crop at 2x the voxel size
        tokens = [t for t in range(g**3)
                  if (t // (g * g)) * p * 2 // v == d0 // v and ((t // g) % g) * p * 2 // v == h0 // v
                  and (t % g) * p * 2 // v == w0 // v]
        assert len(tokens) == g**3 // 8
        torch.testing.assert_close(parent12[row], f1[n, tokens].mean(0))
        torch.testing.assert_close(child12[row], f2[row].mean(0))
        assert parent12[row].abs().sum() > 0
    for row in range(l3.num_views):
        # the level-3 view's corner voxel is its source patch's corner (trilinear clamps at the edge)
        n, d, h, w = decode(float(l3.x[row, 0, 0, 0, 0]) * 2 * s**3, s)
        (src,) = [i for i, o in enumerate(origins)
                  if o[0] == n and o[1] <= d < o[1] + v and o[2] <= h < o[2] + v and o[3] <= w < o[3] + v]
        o = origins[src]
        token = ((d - o[1]) // p) * g * g + ((h - o[2]) // p) * g + (w - o[3]) // p
        torch.testing.assert_close(parent23[row], f2[src, token])
        torch.testing.assert_close(child23[row], f3[row].mean(0))


def test_collapse_monitor_reads_a_shared_direction_as_healthy_and_a_collapse_as_collapse():
    torch.manual_seed(0)
    d = 64
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    # spread rows that share one direction (mean pairwise cosine ~0.96, as the un-normalised heads gave at init)
    shared = torch.nn.functional.normalize(u + 0.2 * torch.nn.functional.normalize(torch.randn(32, d), dim=-1), dim=-1)
    cos = shared @ shared.T
    assert float(cos[~torch.eye(32, dtype=torch.bool)].mean()) > 0.9
    assert float(shared.std(0, correction=0).mean()) < 0.05  # the raw monitor reads this as near-collapse
    assert float(centred_z_std(shared)) > 0.8 / math.sqrt(d)
    collapsed = u.expand(32, d) + 1e-5 * torch.randn(32, d)  # one output for every input, up to rounding
    assert float(centred_z_std(torch.nn.functional.normalize(collapsed, dim=-1))) < 1e-6
    # through the head: the monitors come out of alignment_loss
    head = AlignHead(32)
    parent, child = torch.randn(16, 32), torch.randn(16, 32)
    _, mon = alignment_loss(parent, child, head)
    z = torch.nn.functional.normalize(head.projector(parent), dim=-1)
    torch.testing.assert_close(mon["z_std_raw"], z.std(0, correction=0).mean())
    assert float(mon["z_std"]) > 0.5 / math.sqrt(32)
    with torch.no_grad():  # a collapsed projector: a constant output
        head.projector.fc2.weight.zero_()
        head.projector.fc2.bias.normal_()
    _, mon = alignment_loss(parent, child, head)
    assert float(mon["z_std"]) < 1e-6


def test_align_12_depends_on_the_level1_features(ct_crops):
    """Perturbing the level-1 decoder features (the parents of 1<->2) changes align_12 out of step(); a model
    whose alignment ignored them (the published code aligns level 2 with itself) would give the same loss."""
    cfg, model, out, _ = _tiny_step(ct_crops, dtype=torch.float32)
    original = model.encode_decode

    def perturbed(levels):
        results = original(levels)
        (f1, pred1), *rest = results
        noise = torch.randn(f1.shape, generator=torch.Generator().manual_seed(1), dtype=f1.dtype)
        return [(f1 + 0.5 * noise, pred1), *rest]

    model.encode_decode = perturbed
    gen = torch.Generator().manual_seed(0)
    again, _ = model.step(ct_crops.float(), generator=gen)
    assert float(again["rec_l2"]) == pytest.approx(float(out["rec_l2"]))  # same masks: only the parents moved
    assert abs(float(again["align_12"]) - float(out["align_12"])) > 1e-3


def test_projector_output_is_batch_normalised_so_z_do_not_share_a_direction():
    torch.manual_seed(0)
    head = AlignHead(32)
    z = head.projector(torch.randn(64, 32) + 5.0)  # inputs with a large shared component
    torch.testing.assert_close(z.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    zn = torch.nn.functional.normalize(z, dim=-1)
    assert float((zn @ zn.T)[~torch.eye(64, dtype=torch.bool)].mean().abs()) < 0.1


def test_monitors_are_in_every_step(ct_crops):
    _, _, out, _ = _tiny_step(ct_crops, dtype=torch.float32)
    for key in ("rec_l1", "rec_l2", "rec_l3", "align_12", "align_23", "total", "z_std_12", "z_std_23", "tokens"):
        assert key in out and out[key].dim() == 0 and torch.isfinite(out[key])
    assert not out["z_std_12"].requires_grad and not out["z_std_23"].requires_grad
    w = load_config("tiny").loss
    expect = (out["rec_l1"] + out["rec_l2"] + out["rec_l3"] + w.align_weights[0] * out["align_12"]
              + w.align_weights[1] * out["align_23"])
    torch.testing.assert_close(out["total"], expect)
    assert float(out["tokens"]) == 32 + 4 * 25 + 16 * 32


def test_sincos_schedule_moves_weight_from_coarse_to_fine():
    assert rec_weights_at((1, 1, 1), "constant", 0.7) == (1.0, 1.0, 1.0)
    w0, w_half, w1 = (rec_weights_at((1, 1, 1), "sincos", t) for t in (0.0, 0.5, 1.0))
    assert w0[0] == 1 and w0[2] == 0 and abs(w1[0]) < 1e-12 and w1[2] == 1
    assert w0[1] == w_half[1] == w1[1] == 1
    assert abs(w_half[0] - math.sqrt(0.5)) < 1e-12
