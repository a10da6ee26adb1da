"""Every Triton kernel against its reference, forward and backward (mim_scale.ops.parity holds the cases).

On CPU the kernels run under Triton's interpreter at sizes <= 32^3; the ``gpu``-marked tests run the same
cases, plus full-size ones, compiled on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from mim_scale.ops import parity

triton = pytest.importorskip("triton")  # the `test` extra installs it; CI has it

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SCATTER_CASES = [c for c in parity.TOKEN_CASES if not c.duplicates]


@pytest.mark.parametrize("case", parity.MSE_CASES, ids=lambda c: c.name)
def test_masked_norm_pix_mse_matches_reference(case, ct_source):
    out = parity.check_mse(case, ct_source, "cpu")
    if case.mask != "none":
        assert out["loss"] > 0.0


@pytest.mark.parametrize("case", parity.TOKEN_CASES, ids=lambda c: c.name)
def test_gather_tokens_matches_reference(case):
    parity.check_gather(case, "cpu")


@pytest.mark.parametrize("case", SCATTER_CASES, ids=lambda c: c.name)
def test_scatter_tokens_matches_reference(case):
    parity.check_scatter(case, "cpu")


@pytest.mark.parametrize("case", parity.VIEW_CASES, ids=lambda c: c.name)
def test_make_views_matches_reference(case, ct_source):
    parity.check_views(case, ct_source, "cpu")


@pytest.mark.parametrize("case", parity.DW_CASES, ids=lambda c: c.name)
def test_masked_depthwise_conv3d_matches_reference(case, ct_source):
    """Output and the x / weight / bias gradients; odd sizes, k 3 and 5, all- and none-masked, bf16."""
    out = parity.check_depthwise(case, ct_source, "cpu")
    if case.keep == "all":  # everything masked: the output is the bias alone, no gradient reaches x or w
        assert out["err_grad_x"] == 0.0 and out["err_grad_w"] == 0.0


def test_mse_chunked_path_is_exercised(ct_source, monkeypatch):
    """The chunked cases really take the multi-chunk branch (NCHUNK > 1) of the kernel."""
    from mim_scale.ops import loss as K

    seen = []
    real = K._mse_meta
    monkeypatch.setattr(K, "_mse_meta", lambda vol, p: seen.append(real(vol, p)) or seen[-1])
    parity.check_mse(next(c for c in parity.MSE_CASES if c.name == "chunked_c3"), ct_source, "cpu")
    assert len(seen) == 2  # forward and backward
    assert all(m["NCHUNK"] == 3 and m["BLOCK"] == 64 and m["E"] == 192 for m in seen)


def test_parity_check_catches_a_wrong_result(ct_source, monkeypatch):
    """A kernel that is off by a little must fail the check (the harness can fail)."""
    from mim_scale.ops import depthwise as DW
    from mim_scale.ops import loss as K
    from mim_scale.ops import views as V

    real = K.mse_forward
    monkeypatch.setattr(K, "mse_forward", lambda *a: real(*a) * 1.001)
    with pytest.raises(AssertionError, match="loss"):
        parity.check_mse(parity.MSE_CASES[0], ct_source, "cpu")

    real_views = V.views_launch

    def shifted(crop, octants, picks, p, masks):
        out = real_views(crop, octants, picks, p, masks)
        out[-1].view(-1)[0] += 1e-3  # one voxel of the last level-3 view
        return out

    monkeypatch.setattr(V, "views_launch", shifted)
    with pytest.raises(AssertionError, match="level-3"):
        parity.check_views(parity.VIEW_CASES[0], ct_source, "cpu")

    real_wgrad = DW.wgrad_launch
    monkeypatch.setattr(DW, "wgrad_launch", lambda *a: real_wgrad(*a) * 1.001)
    with pytest.raises(AssertionError, match="grad weight"):
        parity.check_depthwise(parity.DW_CASES[0], ct_source, "cpu")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("case", parity.MSE_CASES + parity.MSE_CASES_BIG, ids=lambda c: c.name)
def test_masked_norm_pix_mse_cuda(case, ct_source):
    parity.check_mse(case, ct_source, "cuda")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("case", parity.TOKEN_CASES + parity.TOKEN_CASES_BIG, ids=lambda c: c.name)
def test_gather_scatter_cuda(case):
    parity.check_gather(case, "cuda")
    if not case.duplicates:
        parity.check_scatter(case, "cuda")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("case", parity.VIEW_CASES + parity.VIEW_CASES_BIG, ids=lambda c: c.name)
def test_make_views_cuda(case, ct_source):
    parity.check_views(case, ct_source, "cuda")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("case", parity.DW_CASES + parity.DW_CASES_BIG, ids=lambda c: c.name)
def test_masked_depthwise_conv3d_cuda(case, ct_source):
    parity.check_depthwise(case, ct_source, "cuda")
