"""The model-step benchmark runs a variant in its own process, and labels the published code's stored figure
with its origin instead of dividing it into this run's (issue 21)."""

from __future__ import annotations

from benchmarks.model_step import STORED_REFERENCE, _report, main


def _result(**kw) -> dict:
    r = {"size": "base", "precision": "bf16", "batching": "bucket", "conv": "sparse", "activation_checkpointing": True,
         "compile": False, "batch": 1, "threads": 2, "device": "cpu", "overrides": [], "step_seconds": 20.0,
         "step_seconds_all": [20.0], "peak_rss_gib": 3.0, "flops_per_step": 2.47e12}
    return {**r, **kw}


def test_the_stored_reference_is_labelled_and_never_divided_into_this_run():
    for precision in ("bf16", "fp32"):
        text = _report(_result(precision=precision))
        ref_s, _, origin = STORED_REFERENCE[precision]
        assert f"{ref_s} s" in text and origin in text and "not measured here, no ratio" in text
        assert "faster" not in text and f"{ref_s / 20.0:.2f}x" not in text
    assert "published" not in _report(_result(size="tiny"))  # another input: no reference at all


def test_a_tiny_step_runs_in_a_child_process(capsys):
    assert main(["--size", "tiny", "--precision", "fp32", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "tiny fp32 batching=bucket" in out and "peak RSS" in out and "published" not in out
