"""The HU window, applied where a batch reaches its device: int16 Hounsfield units -> float32 in [0, 1].

The stream hands out int16 crops (2 bytes a voxel through the loader, the pinned buffer and the
host-to-device copy, not 4); the consumer that moves a batch to its device calls :func:`hu_window` there.
The model, its views and its reconstruction targets still see float32 in [0, 1] (targets are cut from
float32 crops, docs/MIM_METHOD.md).

Exactness. An int16 voxel has 65,536 possible values, so the window is a table: :func:`window_reference`
(the one definition of the mapping: clip to ``[hu_min, hu_max]``, subtract ``hu_min``, divide by the width,
in float32 on the CPU) evaluated once for every int16 value, copied to the device and indexed there. Every
device then gives the CPU reference's float32 bits exactly, whatever its arithmetic does with a division
by a scalar (CUDA turns ``x / c`` into ``x * (1 / c)``, which can differ in the last bit). The lookup is
three light elementwise passes (widen to an int32 index, offset it, gather from a table small enough to stay
in cache), about the cost of the formula's four (cast, clamp, subtract, divide): ~50 us
for a 192^3 crop at H200 bandwidth (an estimate; gpu/data_check.py measures it). The table is 256 KiB, kept
per (window, device).
"""

from __future__ import annotations

from functools import lru_cache

import torch

INT16_VALUES = 1 << 16  # size of the table: one entry per int16 value
_INT16_OFFSET = 1 << 15  # table index of int16 value v: v + 32768


def window_reference(hu: torch.Tensor, hu_min: float, hu_max: float) -> torch.Tensor:
    """The window on float32 HU, on the CPU: ``(clip(hu, hu_min, hu_max) - hu_min) / (hu_max - hu_min)``.

    hu: float32 tensor of any shape -> float32 of the same shape in [0, 1]. The definition the table of
    :func:`hu_window` is built from (and what the stream computed on its loaders before int16 batches).
    """
    if hu.dtype != torch.float32:
        raise TypeError(f"window_reference: expected float32 HU, got {hu.dtype}")
    return (hu.clamp(hu_min, hu_max) - hu_min) / (hu_max - hu_min)


@lru_cache(maxsize=16)
def window_table(hu_min: float, hu_max: float, device: torch.device) -> torch.Tensor:
    """float32 (65536,) on ``device``: entry ``v + 32768`` is the window of int16 HU value ``v``."""
    if not hu_max > hu_min:
        raise ValueError(f"HU window [{hu_min}, {hu_max}]: hu_max must be greater than hu_min")
    every_int16 = torch.arange(-_INT16_OFFSET, _INT16_OFFSET, dtype=torch.float32)  # exact in float32
    return window_reference(every_int16, hu_min, hu_max).to(device)


def hu_window(crop: torch.Tensor, hu_min: float, hu_max: float) -> torch.Tensor:
    """int16 HU crops on any device -> float32 in [0, 1] on the same device, bit-identical to
    :func:`window_reference` on the CPU.

    crop: int16 (N, 1, S, S, S) (any shape works) -> float32 (N, 1, S, S, S), a new contiguous tensor.
    """
    if crop.dtype != torch.int16:
        raise TypeError(f"hu_window: expected int16 HU crops, got {crop.dtype} (the stream's batch contract, "
                        "mim_scale/data/stream.py)")
    table = window_table(float(hu_min), float(hu_max), crop.device)
    index = crop.reshape(-1).to(torch.int32).add_(_INT16_OFFSET)
    return table.index_select(0, index).view(crop.shape)
