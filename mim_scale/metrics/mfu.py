"""Model FLOPs utilisation: the one table of device peak FLOP/s, and MFU from a step's FLOPs and time."""

from __future__ import annotations

import sys

# Dense (no sparsity) tensor-core peaks per device, FLOP/s: (bf16/fp16, tf32). Matched in order
# against torch.cuda.get_device_name(); the more specific names come first.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989.4e12, 494.7e12),  # SXM / HBM3
    ("H200", 989.4e12, 494.7e12),
    ("GH200", 989.4e12, 494.7e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("A10G", 70e12, 35e12),
    ("L4", 121e12, 60e12),
)


def device_peak_flops(precision: str = "bf16", device_name: str | None = None) -> float | None:
    """Peak dense FLOP/s of the current CUDA device for ``precision`` ("bf16", "fp16", "fp32" = TF32).

    ``None`` when unknown (CPU, an unlisted GPU): then MFU is not reported unless
    ``metrics.device_peak_flops`` is configured.
    """
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    if device_name is None:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, half, tf32 in PEAK_FLOPS:
        if key in device_name:
            return tf32 if precision == "fp32" else half
    return None


def compute_mfu(flops_per_sample: float, samples: int, step_seconds: float, peak_flops: float | None) -> float | None:
    """MFU of one rank: ``flops_per_sample * samples / step_seconds / peak_flops`` (``None`` if no peak).

    samples: crops this rank trained on in the step (micro_batch * grad_accum); flops_per_sample:
    training FLOPs per crop (``mim_scale.model.flops_per_sample``).
    """
    if not peak_flops or step_seconds <= 0:
        return None
    return float(flops_per_sample) * samples / step_seconds / float(peak_flops)



def run_peak_flops(configured: float, precision: str, device) -> float | None:
    """The peak FLOP/s a run's MFU is measured against: ``metrics.device_peak_flops`` when set (> 0), else the
    table's figure for the CUDA device the run trains on (``device``: a ``torch.device``), else ``None`` (CPU)."""
    if configured > 0:
        return float(configured)
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    return device_peak_flops(precision, torch.cuda.get_device_name(device))
