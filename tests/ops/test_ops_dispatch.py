"""The dispatch point: same signatures as the references, right path per device/backend, clear errors."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

import mim_scale.ops as ops
from mim_scale.ops import parity, reference as R


def _inputs(ct_source, n=2, size=16, p=4):
    vol = parity.crops(ct_source, n, 1, (size,) * 3, seed=1)
    length = (size // p) ** 3
    g = torch.Generator().manual_seed(0)
    pred = torch.randn((n, length, p**3), generator=g)
    mask = (torch.rand((n, length), generator=g) < 0.6).float()
    return pred, vol, mask


@pytest.mark.parametrize("name", ops.FUSED_OPS)
def test_signatures_match_the_reference(name):
    assert inspect.signature(getattr(ops, name)) == inspect.signature(getattr(R, name))
    assert inspect.signature(ops.OP_MODULES[name].fused) == inspect.signature(getattr(R, name))


def test_cpu_tensors_take_the_reference_by_default(ct_source):
    pred, vol, mask = _inputs(ct_source)
    ops.calls.clear()
    assert ops.get_backend() == "auto"
    got = ops.masked_norm_pix_mse(pred, vol, mask, 4)
    assert torch.equal(got, R.masked_norm_pix_mse(pred, vol, mask, 4))
    assert ops.calls[("masked_norm_pix_mse", "reference")] == 1
    assert ops.calls[("masked_norm_pix_mse", "triton")] == 0


@pytest.mark.skipif(not ops.triton_available(), reason="needs triton")
def test_forced_triton_backend_runs_the_kernels_with_autograd(ct_source):
    pred, vol, mask = _inputs(ct_source)
    ops.calls.clear()
    p1 = pred.clone().requires_grad_(True)
    p2 = pred.clone().requires_grad_(True)
    with ops.backend("triton"):
        assert ops.get_backend() == "triton"
        loss = ops.masked_norm_pix_mse(p1, vol, mask, 4)
        ids = torch.tensor([[0, 5, 9], [63, 2, 1]])
        tok = ops.gather_tokens(p1, ids)
        full = ops.scatter_tokens(tok, ids, torch.zeros(64), 64)
    assert ops.get_backend() == "auto"
    ref = R.masked_norm_pix_mse(p2, vol, mask, 4)
    ref_full = R.scatter_tokens(R.gather_tokens(p2, ids), ids, torch.zeros(64), 64)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(full, ref_full)
    (loss + full.square().sum()).backward()
    (ref + ref_full.square().sum()).backward()
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-5, atol=1e-7)
    assert {op for (op, path), k in ops.calls.items() if path == "triton" and k} == {
        "masked_norm_pix_mse", "gather_tokens", "scatter_tokens"}


@pytest.mark.skipif(not ops.triton_available(), reason="needs triton")
def test_target_that_needs_grad_goes_to_the_reference(ct_source):
    pred, vol, mask = _inputs(ct_source)
    vol = vol.clone().requires_grad_(True)
    ops.calls.clear()
    with ops.backend("triton"):
        ops.masked_norm_pix_mse(pred, vol, mask, 4).backward()
    assert ops.calls[("masked_norm_pix_mse", "reference")] == 1
    assert vol.grad is not None and vol.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="vol requires grad"):
        ops.loss.fused(pred, vol, mask, 4)


@pytest.mark.skipif(not ops.triton_available(), reason="needs triton")
def test_kernel_paths_reject_bad_shapes_and_ids(ct_source):
    pred, vol, mask = _inputs(ct_source)
    with pytest.raises(ValueError, match=r"pred must be \(N, L, p\^3\*C\)"):
        ops.loss.fused(pred[:, :10], vol, mask, 4)
    with pytest.raises(ValueError, match="not divisible by patch size 5"):
        ops.loss.fused(pred, vol, mask, 5)
    with pytest.raises(ValueError, match="mask must be"):
        ops.loss.fused(pred, vol, mask[:, :3], 4)
    with pytest.raises(ValueError, match=r"gather_tokens ids must lie in \[0, 64\)"):
        ops.gather.fused(pred, torch.tensor([[0, 64], [1, 2]]))
    with pytest.raises(ValueError, match="make_views octants must lie in"):
        crop = parity.crops(ct_source, 1, 1, (16, 16, 16), seed=0)
        ops.views.fused(crop, torch.tensor([[8]]), torch.zeros((1, 1, 1), dtype=torch.long), 4)
    with pytest.raises(ValueError, match="level-2 mask must be"):
        crop = parity.crops(ct_source, 1, 1, (16, 16, 16), seed=0)
        ops.views.fused(crop, torch.tensor([[1]]), torch.zeros((1, 1, 1), dtype=torch.long), 4,
                                  (torch.zeros(1, 8), torch.zeros(2, 8), torch.zeros(1, 8)))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="ops backend must be one of"):
        ops.set_backend("cuda")
    assert ops.get_backend() == "auto"


def test_package_imports_and_works_without_triton(ct_source):
    """A CPU-only install without triton: the package imports and every op answers with the reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mim_scale.ops as ops\n"
        "assert not ops.triton_available(), 'triton should be unavailable'\n"
        "x = torch.randn(2, 8, 5); ids = torch.tensor([[1, 3], [0, 7]])\n"
        "assert torch.equal(ops.gather_tokens(x, ids), ops.reference.gather_tokens(x, ids))\n"
        "try:\n    ops.set_backend('triton')\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "refused: ops backend 'triton' needs triton" in res.stdout
