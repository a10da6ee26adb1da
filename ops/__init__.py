"""MiM's masking, patching and masked-conv operations behind one dispatch point (``mim_scale.ops``).

One file per op holds its torch reference, its Triton kernel(s) and its autograd Function (Liger style):

    loss.py       masked_norm_pix_mse(pred, vol, mask, p, eps)         MAE's normalised-pixel loss, masked
    gather.py     gather_tokens(x, ids)                                the encoder's visible tokens
    scatter.py    scatter_tokens(visible, ids_keep, fill, length)      the decoder's grid with mask tokens
    views.py      make_views(crop, octants, picks, p, masks)           MiM's three levels of views, one launch
    depthwise.py  masked_depthwise_conv3d(x, keep, weight, bias)       a conv block's dw(x * keep), channels-last

Each public function here has its op's reference signature and semantics and picks the path per call:
backend ``"auto"`` (default) runs an op's fused kernel only on a device where a measured figure says it wins
(:mod:`mim_scale.ops.auto`, which states the figures; today: no kernel on any measured card, nothing on CPU),
``"reference"`` always the torch reference, ``"triton"`` always the kernel (on CPU tensors through Triton's
interpreter: slow, for checks). Override with ``MIM_SCALE_OPS_BACKEND=auto|reference|triton``,
:func:`set_backend`, or ``with ops.backend(...)``. ``calls`` counts ``(op, "triton" | "reference")`` per call,
so a test or a benchmark can see which path served a run. Without triton the package imports and every op
answers with its reference.

    from mim_scale import ops
    loss = ops.masked_norm_pix_mse(pred, vol, mask, p)      # (N, L, p^3 C), (N, C, D, H, W), (N, L)
    with ops.backend("reference"):
        ...
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Iterator

import torch

from . import _triton, auto, depthwise, gather, loss, reference, scatter, views
from .patches import norm_pix_target, patchify, unpatchify, upsample_token_mask
from .views import apply_token_mask, downsample2x, octant_views, patch_views

BACKENDS = ("auto", "reference", "triton")

# op name -> its file (each has ``reference`` and ``fused`` with the op's signature)
OP_MODULES = {"masked_norm_pix_mse": loss, "gather_tokens": gather, "scatter_tokens": scatter,
              "make_views": views, "masked_depthwise_conv3d": depthwise}
FUSED_OPS = tuple(OP_MODULES)
TRITON_IMPORT_ERROR = _triton.IMPORT_ERROR

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
    """Choose the path for every later call: "auto" (measured winners), "reference", or "triton" (always)."""
    global _backend
    name = _validated(name)
    if name == "triton" and not _triton.available():
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
    return _triton.available()


def fused_enabled(op: str, *tensors: torch.Tensor | None, eligible: bool = True) -> bool:
    """Whether a call of ``op`` on ``tensors`` goes to the fused kernel (no counting; see :func:`_route`)."""
    if op not in OP_MODULES:
        raise KeyError(f"unknown op {op!r}; ops are {FUSED_OPS}")
    if _backend == "reference" or not _triton.available() or not eligible:
        return False
    if _backend == "triton":
        return True
    present = [t for t in tensors if t is not None]
    device = present[0].device
    return all(t.device == device for t in present) and auto.enabled(op, device)


def _route(op: str, tensors: tuple[torch.Tensor | None, ...], eligible: bool = True):
    """The function that serves this call (the op's ``fused`` or ``reference``), counted in ``calls``."""
    use = fused_enabled(op, *tensors, eligible=eligible)
    if not torch.compiler.is_compiling():
        calls[(op, "triton" if use else "reference")] += 1
    module = OP_MODULES[op]
    return module.fused if use else module.reference


def masked_norm_pix_mse(pred: torch.Tensor, vol: torch.Tensor, mask: torch.Tensor, p: int,
                        eps: float = 1e-6) -> torch.Tensor:
    """See :mod:`mim_scale.ops.loss`. A ``vol`` that requires grad goes to the reference (the fused kernel
    treats the normalised target as a constant)."""
    return _route("masked_norm_pix_mse", (pred, vol, mask), eligible=not vol.requires_grad)(pred, vol, mask, p, eps)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """See :mod:`mim_scale.ops.gather`."""
    return _route("gather_tokens", (x, ids))(x, ids)


def scatter_tokens(visible: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, length: int) -> torch.Tensor:
    """See :mod:`mim_scale.ops.scatter`."""
    return _route("scatter_tokens", (visible, ids_keep, fill))(visible, ids_keep, fill, length)


def make_views(crop: torch.Tensor, octants: torch.Tensor, picks: torch.Tensor, p: int,
               masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :mod:`mim_scale.ops.views`. A crop that requires grad goes to the reference (the kernel has no
    backward)."""
    tensors = (crop, octants, picks) + (tuple(masks) if masks is not None else ())
    return _route("make_views", tensors, eligible=not crop.requires_grad)(crop, octants, picks, p, masks)


def masked_depthwise_conv3d(x: torch.Tensor, keep: torch.Tensor | None, weight: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """See :mod:`mim_scale.ops.depthwise`. A ``keep`` that requires grad goes to the reference."""
    eligible = keep is None or not keep.requires_grad
    return _route("masked_depthwise_conv3d", (x, keep, weight, bias), eligible=eligible)(x, keep, weight, bias)


__all__ = [
    "BACKENDS", "FUSED_OPS", "OP_MODULES", "apply_token_mask", "auto", "backend", "calls", "downsample2x",
    "fused_enabled", "gather_tokens", "get_backend", "make_views", "masked_depthwise_conv3d",
    "masked_norm_pix_mse", "norm_pix_target", "octant_views", "patch_views", "patchify", "reference", "scatter_tokens",
    "set_backend", "triton_available", "unpatchify", "upsample_token_mask",
]
