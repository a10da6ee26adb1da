"""Masking and patching operations for MiM, behind one dispatch point.

Every operation here has the signature and semantics of its plain-torch namesake in
:mod:`mim_scale.ops.reference`. With the default backend ``"auto"``, CUDA tensors go to the fused Triton
kernels (:mod:`mim_scale.ops.triton_ops`, autograd included) for the operations that measured faster than
eager torch on a GPU (:data:`AUTO_TRITON`), when triton imports; everything else goes to the reference. Override for a process with ``MIM_SCALE_OPS_BACKEND=auto|reference|triton``, or in code::

    from mim_scale import ops
    loss = ops.masked_norm_pix_mse(pred, vol, mask, p)      # (N, L, p^3 C), (N, C, D, H, W), (N, L)
    with ops.backend("reference"):                          # e.g. to time a step without the kernels
        ...

``"triton"`` forces the kernels even on CPU tensors (run by Triton's interpreter: slow, for checks only).
``calls`` counts which path served each call, so a benchmark can tell whether a model routes through here.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Iterator

import torch

from . import reference
from .reference import (apply_token_mask, downsample2x, norm_pix_target, octant_views, patch_views, patchify,
                        unpatchify, upsample_token_mask)

try:  # triton is optional (the `gpu`/`test` extras); CPU-only installs use the references
    from . import triton_ops
    TRITON_IMPORT_ERROR: Exception | None = None
except (ImportError, RuntimeError, OSError) as exc:  # a broken triton install must not break the package
    triton_ops = None
    TRITON_IMPORT_ERROR = exc

BACKENDS = ("auto", "reference", "triton")
FUSED_OPS = ("masked_norm_pix_mse", "gather_tokens", "scatter_tokens", "make_views")

# Which fused kernels "auto" uses on CUDA: only those measured faster than eager torch in the way the
# model uses them (H200, docs/gpu-results/2026-11-26-h200/ops_bench.txt). The loss kernel is faster in
# the forward pass alone (x1.61) but slower forward + backward (x0.84); gather and scatter are about 4x
# slower than eager indexing; the view kernel is x1.94 faster (no backward needed). Use backend "triton"
# to force them all.
AUTO_TRITON = {"masked_norm_pix_mse": False, "gather_tokens": False, "scatter_tokens": False, "make_views": True}

calls: collections.Counter = collections.Counter()  # (op name, "triton" | "reference") -> calls


def _validated(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"ops backend must be one of {BACKENDS}, got {name!r} "
                         f"(from MIM_SCALE_OPS_BACKEND or set_backend)")
    return name


_backend = _validated(os.environ.get("MIM_SCALE_OPS_BACKEND", "auto"))


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Choose the path for every later call: "auto" (Triton on CUDA), "reference", or "triton" (always)."""
    global _backend
    name = _validated(name)
    if name == "triton" and triton_ops is None:
        raise RuntimeError(f"ops backend 'triton' needs triton, which failed to import: {TRITON_IMPORT_ERROR}")
    _backend = name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_available() -> bool:
    return triton_ops is not None


def _use_triton(op: str, tensors: tuple[torch.Tensor, ...], eligible: bool = True) -> bool:
    if _backend == "reference" or triton_ops is None or not eligible:
        use = False
    elif _backend == "triton":
        use = True
    else:
        use = AUTO_TRITON.get(op, False) and all(t.is_cuda for t in tensors)
    if not torch.compiler.is_compiling():
        calls[(op, "triton" if use else "reference")] += 1
    return use


def masked_norm_pix_mse(pred: torch.Tensor, vol: torch.Tensor, mask: torch.Tensor, p: int,
                        eps: float = 1e-6) -> torch.Tensor:
    """See :func:`reference.masked_norm_pix_mse`. A ``vol`` that requires grad goes to the reference (the
    fused kernel treats the normalised target as a constant)."""
    if _use_triton("masked_norm_pix_mse", (pred, vol, mask), eligible=not vol.requires_grad):
        return triton_ops.masked_norm_pix_mse(pred, vol, mask, p, eps)
    return reference.masked_norm_pix_mse(pred, vol, mask, p, eps)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """See :func:`reference.gather_tokens`."""
    if _use_triton("gather_tokens", (x, ids)):
        return triton_ops.gather_tokens(x, ids)
    return reference.gather_tokens(x, ids)


def scatter_tokens(visible: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, length: int) -> torch.Tensor:
    """See :func:`reference.scatter_tokens`."""
    if _use_triton("scatter_tokens", (visible, ids_keep, fill)):
        return triton_ops.scatter_tokens(visible, ids_keep, fill, length)
    return reference.scatter_tokens(visible, ids_keep, fill, length)


def make_views(crop: torch.Tensor, octants: torch.Tensor, picks: torch.Tensor, p: int,
               masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`reference.make_views`. A crop that requires grad goes to the reference."""
    tensors = (crop, octants, picks) + (tuple(masks) if masks is not None else ())
    if _use_triton("make_views", tensors, eligible=not crop.requires_grad):
        return triton_ops.make_views(crop, octants, picks, p, masks)
    return reference.make_views(crop, octants, picks, p, masks)


__all__ = [
    "BACKENDS", "FUSED_OPS", "apply_token_mask", "backend", "calls", "downsample2x", "gather_tokens",
    "get_backend", "make_views", "masked_norm_pix_mse", "norm_pix_target", "octant_views", "patch_views",
    "patchify", "reference", "scatter_tokens", "set_backend", "triton_available", "unpatchify",
    "upsample_token_mask",
]
