"""What backend ``auto`` picks, per op and per device: only a fused kernel that a measured figure says wins.

The table holds, per card (``torch.cuda.get_device_name()``, exactly) and per op, the figure measured by
``python benchmarks/ops_kernels.py`` on that card (run by ``gpu/run_all.sh``), with the file it came from. The
decision is computed from the figure by one rule, :func:`wins`: a kernel is on where it is at least
:data:`MIN_VS_EAGER` times faster than eager torch (what the model runs) *and* :data:`MIN_VS_COMPILE` times
faster than ``torch.compile`` of the same reference, in the pass the model uses (``fwd+bwd`` for ops that are
differentiated in training; ``fwd`` for the views, which have no gradient). An op with no figure on a card,
and any card not in the table, and CPU tensors, get the torch reference.

To add a card or refresh a figure: run ``gpu/run_all.sh`` there, copy the numbers from its
``ops_bench.json`` here with the file's path, and let the rule decide; never set a decision by hand.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# A kernel must beat eager by this much to be worth its maintenance and its graph break under compile.
MIN_VS_EAGER = 1.3
# ...and beat torch.compile of the reference by this much (a model compiled end to end would use that instead;
# the margin is issue 17's, and above the ~5 % run-to-run spread of the bench's medians).
MIN_VS_COMPILE = 1.1


@dataclass(frozen=True)
class Figure:
    """One measured comparison: ``direction`` ("fwd" or "fwd+bwd") at the bench's base shapes, ratios of the
    reference's median time to the kernel's (``vs_eager`` = eager ms / Triton ms), and where it is written."""

    direction: str
    vs_eager: float
    vs_compile: float
    source: str


# The pass the model runs each op in during training (the one a figure must come from).
MODEL_PASS = {
    "masked_norm_pix_mse": "fwd+bwd",
    "gather_tokens": "fwd+bwd",
    "scatter_tokens": "fwd+bwd",
    "make_views": "fwd",
    "masked_depthwise_conv3d": "fwd+bwd",
}

_H200 = "docs/gpu-results/2026-11-26-h200/ops_bench.json"

# card name -> op -> figure. Ops absent for a card are unmeasured there (off).
MEASURED: dict[str, dict[str, Figure]] = {
    "NVIDIA H200": {
        # 0.823 ms Triton vs 0.689 ms eager, 0.638 ms compile: the forward alone wins (x1.61) but the
        # training pass loses -> off
        "masked_norm_pix_mse": Figure("fwd+bwd", 0.837, 0.775, _H200),
        # 0.842 ms vs 0.223 ms eager: launch-bound rows, atomics in backward -> off
        "gather_tokens": Figure("fwd+bwd", 0.265, 0.816, _H200),
        # 0.681 ms vs 0.215 ms eager -> off
        "scatter_tokens": Figure("fwd+bwd", 0.316, 0.838, _H200),
        # 0.350 ms vs 0.678 ms eager, 0.368 ms compile (13.9% of 4.8 TB/s): x1.05 vs compile, under the 1.1
        # margin -> off until a faster kernel or a new figure
        "make_views": Figure("fwd", 1.936, 1.051, _H200),
        # masked_depthwise_conv3d: not measured on any card yet (the kernel is newer than the last lent GPU);
        # it stays off until `python benchmarks/ops_kernels.py` shows it ahead of cuDNN's channels-last
        # depthwise conv (the eager path) and of torch.compile.
    },
}


def wins(op: str, figure: Figure | None) -> bool:
    """The one rule: measured in the model's pass, >= MIN_VS_EAGER x eager and >= MIN_VS_COMPILE x compile."""
    return (figure is not None and figure.direction == MODEL_PASS[op]
            and figure.vs_eager >= MIN_VS_EAGER and figure.vs_compile >= MIN_VS_COMPILE)


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def device_name(device: torch.device) -> str:
    """The name the table is keyed by: the CUDA card's name, or the device type ("cpu") elsewhere."""
    return _device_name(device) if device.type == "cuda" else device.type


def enabled(op: str, device: torch.device) -> bool:
    """Whether ``auto`` runs ``op``'s fused kernel on ``device``."""
    return wins(op, MEASURED.get(device_name(device), {}).get(op))


def explain(device_names: list[str] | None = None) -> list[str]:
    """One line per (card, op): the decision and the figure that made it (for docs and the bench's output)."""
    lines = []
    for card in device_names or sorted(MEASURED):
        for op in MODEL_PASS:
            fig = MEASURED.get(card, {}).get(op)
            if fig is None:
                lines.append(f"{card}: {op}: off (no measurement on this card)")
            else:
                lines.append(f"{card}: {op}: {'on' if wins(op, fig) else 'off'} ({fig.direction} x{fig.vs_eager:.2f} "
                             f"vs eager, x{fig.vs_compile:.2f} vs compile; {fig.source})")
    return lines
