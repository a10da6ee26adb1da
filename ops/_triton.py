"""What every op file shares about Triton: the optional import, per-call jitting, launch helpers.

triton is optional (the ``gpu``/``test`` extras): without it every op file still imports (its kernel bodies
are plain functions, its references are plain torch) and the dispatcher answers with the references.

Each op file keeps its kernel bodies undecorated and registers them with :class:`Kernels`, which jits them on
first use: compiled for CUDA tensors, run by Triton's interpreter for CPU tensors (the ``TRITON_INTERPRET=1``
path). Triton reads ``TRITON_INTERPRET`` when a function is decorated, so choosing per call, rather than by the
environment at import time, lets the CPU parity tests share one pytest process with everything else, whatever
imported triton first.

Kernel bodies call only Triton builtins: ``tl.sum``/``tl.zeros`` are themselves jitted helpers, which the
interpreter cannot call when triton was imported without ``TRITON_INTERPRET=1``; ``tl.reduce`` with the
standard sum combiner and ``tl.full`` compile to the same code and take the interpreter's fast path.
Every kernel computes in fp32 and stores in the output's dtype; offsets that can exceed 2^31 are int64.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Callable

import torch

try:
    import triton
    import triton.language as tl
    IMPORT_ERROR: Exception | None = None
except (ImportError, RuntimeError, OSError) as exc:  # a broken triton install must not break the package
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    IMPORT_ERROR = exc


def available() -> bool:
    return triton is not None


def require() -> None:
    if triton is None:
        raise RuntimeError(f"this fused kernel needs triton, which failed to import: {IMPORT_ERROR}")


class Kernels:
    """A named set of kernel bodies, jitted lazily per mode (compiled / interpreted).

    ``Kernels(mse=body, ...).for_tensor(t).mse[grid](...)``.
    """

    def __init__(self, **bodies: Callable):
        self.bodies = bodies
        self._jitted = functools.lru_cache(maxsize=2)(self._jit)

    def _jit(self, interpret: bool) -> SimpleNamespace:
        require()
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            return SimpleNamespace(**{name: triton.jit(body) for name, body in self.bodies.items()})
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous

    def jitted(self, interpret: bool) -> SimpleNamespace:
        return self._jitted(interpret)

    def for_tensor(self, t: torch.Tensor) -> SimpleNamespace:
        """Compiled kernels for CUDA tensors; interpreted ones for CPU tensors (or when TRITON_INTERPRET=1)."""
        return self._jitted(not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def warps(block: int) -> int:
    """num_warps for a 1-D block of ``block`` elements."""
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_ids(ids: torch.Tensor, upper: int, what: str) -> None:
    """Index range check without a host sync on CUDA (device-side assert)."""
    if ids.numel() == 0:
        return
    ok = ((ids >= 0) & (ids < upper)).all()
    if ids.is_cuda:
        torch._assert_async(ok, f"{what} out of range [0, {upper})")
    elif not bool(ok):
        raise ValueError(f"{what} must lie in [0, {upper}); got values in [{int(ids.min())}, {int(ids.max())}]")
