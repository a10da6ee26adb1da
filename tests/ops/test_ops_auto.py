"""`auto`'s per-device table: its figures are the measured ones, and the one rule decides from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mim_scale import ops
from mim_scale.ops import auto

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("card, op", [(c, o) for c, figs in auto.MEASURED.items() for o in figs])
def test_table_figures_are_the_ones_in_their_source_file(card, op):
    fig = auto.MEASURED[card][op]
    data = json.loads((REPO / fig.source).read_text())
    assert data["device"] == card
    rec = next(r for r in data["kernels"] if r["kernel"] == op and r["direction"] == fig.direction)
    assert fig.vs_eager == pytest.approx(rec["speedup_vs_eager"], abs=5e-4)
    assert fig.vs_compile == pytest.approx(rec["speedup_vs_compile"], abs=5e-4)


def test_h200_decisions_follow_from_the_figures():
    """No kernel wins on the H200: the view kernel beats eager (x1.94) but not torch.compile by the margin
    (x1.05 < 1.1); the rest lose in the pass the model runs (loss fwd+bwd x0.84, gather x0.27, scatter x0.32),
    and the depthwise kernel is unmeasured."""
    on = {op for op in auto.MODEL_PASS if auto.wins(op, auto.MEASURED["NVIDIA H200"].get(op))}
    assert on == set()
    assert auto.MEASURED["NVIDIA H200"]["make_views"].vs_compile < auto.MIN_VS_COMPILE
    assert "masked_depthwise_conv3d" not in auto.MEASURED["NVIDIA H200"]


def test_rule_needs_the_models_pass_and_both_margins():
    assert not auto.wins("masked_norm_pix_mse", auto.Figure("fwd", 1.61, 1.2, "x"))  # forward alone is not enough
    assert not auto.wins("make_views", auto.Figure("fwd", 1.29, 1.2, "x"))  # under MIN_VS_EAGER
    assert not auto.wins("make_views", auto.Figure("fwd", 2.0, 0.99, "x"))  # loses to torch.compile
    assert not auto.wins("make_views", auto.Figure("fwd", 2.0, 1.09, "x"))  # under MIN_VS_COMPILE
    assert auto.wins("make_views", auto.Figure("fwd", 1.3, 1.1, "x"))
    assert not auto.wins("make_views", None)


def test_cpu_and_unknown_cards_get_the_references(monkeypatch):
    x = torch.zeros(2, 3, 4)
    assert ops.get_backend() == "auto"
    for op in ops.FUSED_OPS:
        assert not auto.enabled(op, torch.device("cpu"))
    assert not ops.fused_enabled("gather_tokens", x)
    monkeypatch.setattr(auto, "device_name", lambda device: "Some Future GPU")
    assert not any(auto.enabled(op, torch.device("cpu")) for op in ops.FUSED_OPS)
    monkeypatch.setattr(auto, "device_name", lambda device: "NVIDIA H200")
    assert [op for op in ops.FUSED_OPS if auto.enabled(op, torch.device("cpu"))] == []
    monkeypatch.setitem(auto.MEASURED, "NVIDIA H200", {"make_views": auto.Figure("fwd", 1.94, 1.2, "test")})
    assert [op for op in ops.FUSED_OPS if auto.enabled(op, torch.device("cpu"))] == ["make_views"]


def test_explain_names_each_decision_and_its_source():
    lines = auto.explain(["NVIDIA H200"])
    assert len(lines) == len(auto.MODEL_PASS)
    assert any(line.startswith("NVIDIA H200: make_views: off (fwd x1.94 vs eager, x1.05 vs compile")
               for line in lines)
    assert "NVIDIA H200: masked_depthwise_conv3d: off (no measurement on this card)" in lines
