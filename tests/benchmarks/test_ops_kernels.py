"""The GPU benchmark's dry run (CPU, tiny sizes) exercises every path it times on a GPU."""

from __future__ import annotations

import json

import pytest

from mim_scale import ops
from benchmarks import ops_kernels as bench

pytestmark = pytest.mark.skipif(not ops.triton_available(), reason="the benchmark needs triton")


def test_dry_run_times_every_kernel_and_the_step(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--dry-run", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["dry_run"] is True
    seen = {(r["kernel"], r["direction"]) for r in res["kernels"]}
    assert seen == {("masked_norm_pix_mse", "fwd"), ("masked_norm_pix_mse", "fwd+bwd"), ("gather_tokens", "fwd"),
                    ("gather_tokens", "fwd+bwd"), ("scatter_tokens", "fwd"), ("scatter_tokens", "fwd+bwd"),
                    ("make_views", "fwd"), ("masked_depthwise_conv3d", "fwd"),
                    ("masked_depthwise_conv3d", "fwd+bwd")}
    assert len(res["auto_decisions"]) == len(ops.auto.MODEL_PASS)
    for r in res["kernels"]:
        assert set(r["ms"]) == {"triton", "eager", "compile"}, r
        assert all(v > 0 for v in r["ms"].values()) and r["useful_bytes"] > 0
    e2e = res["end_to_end"]
    if "skipped" not in e2e:  # the model package is present: both backends ran a full step
        assert e2e["without_kernels"]["ms_per_step"] > 0 and e2e["auto"]["ms_per_step"] > 0
        assert e2e["without_kernels"]["calls"].get("masked_norm_pix_mse:reference", 0) >= 1


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H200", 4.8e12),
                                        ("NVIDIA H100 PCIe", 2.0e12), ("Some Other GPU", None)])
def test_peak_bandwidth_by_device_name(name, peak):
    assert bench.peak_bandwidth(name) == peak


def test_refuses_to_run_for_real_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--no-e2e", "--no-compile"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
