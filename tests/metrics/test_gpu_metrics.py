"""GPU side of the worker metrics: CUDA peak memory and the device's peak FLOP/s (run with -m gpu)."""

from __future__ import annotations

import pytest
import torch

from mim_scale.metrics import TrainMetrics, device_peak_flops

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu-marked metrics tests need a CUDA device (run them with -m gpu on a GPU machine)")


def test_device_memory_is_cuda_max_allocated():
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
    m = TrainMetrics("gpu", 0, serve=False)
    value = m.record_device_memory()
    assert value == torch.cuda.max_memory_allocated() >= 256 * 2**20
    assert m.sample("mim_device_memory_peak_bytes") == value
    del x


def test_this_device_has_a_known_peak():
    name = torch.cuda.get_device_name()
    peak = device_peak_flops("bf16")
    assert peak is not None, f"no peak FLOP/s listed for {name!r}: add it to mim_scale.metrics.PEAK_FLOPS"
    print(f"{name}: bf16 peak {peak / 1e12:.1f} TFLOP/s")
