"""Memory caps of one shard-builder worker, in bytes, derived from the memory that worker may use.

Every reader checks what an input *declares* against these caps before it allocates or inflates
anything: a 64-byte header can declare a 1-Gvoxel float volume, a 2 MB Deflated DICOM can inflate
to 2 GiB, a 64^3 volume at 30 mm resamples to 1280^3 at 1.5 mm. A voxel count alone is not enough
(1 Gvoxel of float64 is 8 GiB, of uint8 1 GiB), so the caps are in bytes of working memory: the
bytes per voxel each pipeline stage holds at its peak, times the voxels it holds them for.

The per-stage figures below are what the code in ``dicom``, ``nifti``, ``geometry`` and ``worker``
keeps alive at once (see the comments); ``python benchmarks/shard_memory.py`` measures the peak
resident memory of a build on an input just under the cap and on the bomb corpus.

Public helpers for any reader (the NIfTI and DICOM readers use them; new readers should too):
``MemoryLimits.check_source(shape, stored_itemsize, source)`` before reading the voxel data,
``MemoryLimits.check_resample(...)`` before resampling, ``MemoryLimits.header_bytes`` for the most
header (plus extensions) a reader may read or inflate before the data, and ``check_bytes`` for anything
else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mim_scale.shards.rejects import InputRejected

DEFAULT_WORKER_MEMORY_BYTES = 4 << 30
# the worker process itself: ~76 MiB resident with numpy, scipy, pydicom, nibabel imported
# (``benchmarks/shard_memory.py``; a Ray worker ~330 MiB, README), plus decoders loaded on first use and allocator slack (~80 MiB building the sample
# series); the rest of the worker memory is the budget for one volume
RESERVED_BYTES = 384 << 20
MIN_WORKER_MEMORY_BYTES = RESERVED_BYTES + (16 << 20)
# largest DICOM header (after inflation, pixel data excluded) or NIfTI header + extensions read before the
# data; enhanced multi-frame CT with per-frame functional groups reaches a few MiB for thousands of frames
HEADER_BYTES = 16 << 20
# elements a DICOM file may carry after its pixel data (padding, signatures), inflated
TRAILER_BYTES = 1 << 20

# working bytes per voxel, by stage (float32 HU = 4 bytes):
# load: the stored samples of every slice/file stay alive while they are rescaled into the float32
#   stack (stored + 4), then canonicalize copies the stack (4 + 4)
LOAD_FLOAT_BYTES = 8
# resample: the float32 source plus its Gaussian-filtered copy (8 per source voxel) and the float32
#   output (4 per output voxel)
RESAMPLE_SOURCE_BYTES = 8
RESAMPLE_OUTPUT_BYTES = 4
# finish, per output voxel: float32 volume (4), the rint/clip temporaries of the int16 conversion (8),
#   the int16 volume (2); then the int16 volume and its encoded bytes (2 + 2 + 2 while they are copied)
FINISH_BYTES = 16


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (for reject details and logs)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _voxels(shape: tuple[int, ...]) -> int:
    # Python ints: no overflow for hostile shapes (30000^3 * 8 does not fit an int64 product check)
    return math.prod(int(s) for s in shape)


@dataclass(frozen=True)
class MemoryLimits:
    """Caps for one worker that may use ``worker_memory_bytes`` of resident memory in all.

    ``budget_bytes`` (the worker memory less RESERVED_BYTES for the interpreter and libraries) bounds the
    working memory of one volume at every stage. Every ``check_*`` raises ``InputRejected("too_large")``
    with the figure, the cap and the option that raises it.
    """

    worker_memory_bytes: int = DEFAULT_WORKER_MEMORY_BYTES

    def __post_init__(self) -> None:
        if self.worker_memory_bytes < MIN_WORKER_MEMORY_BYTES:
            raise ValueError(f"worker memory {format_bytes(self.worker_memory_bytes)} is below the minimum "
                             f"{format_bytes(MIN_WORKER_MEMORY_BYTES)}")

    @property
    def budget_bytes(self) -> int:
        return self.worker_memory_bytes - RESERVED_BYTES

    @property
    def header_bytes(self) -> int:
        """Most bytes of header (+ extensions) a reader may read or inflate before the data."""
        return min(HEADER_BYTES, self.budget_bytes)

    def check_bytes(self, nbytes: int, what: str, source: str | None = None) -> None:
        """Reject when ``nbytes`` of working memory for ``what`` exceed the budget."""
        if nbytes > self.budget_bytes:
            raise InputRejected(
                "too_large",
                f"{what} needs {format_bytes(nbytes)}, over the {format_bytes(self.budget_bytes)} a builder worker may "
                f"use for one volume (--worker-memory {format_bytes(self.worker_memory_bytes)} less "
                f"{format_bytes(RESERVED_BYTES)} reserved)",
                source,
            )

    def source_bytes(self, shape: tuple[int, ...], stored_itemsize: int) -> int:
        """Working bytes of loading a volume of ``shape`` stored with ``stored_itemsize`` bytes per sample."""
        return _voxels(shape) * (int(stored_itemsize) + LOAD_FLOAT_BYTES)

    def check_source(self, shape: tuple[int, ...], stored_itemsize: int, source: str | None = None) -> None:
        """Before the voxel data of a (D, H, W) or any-order ``shape`` is read or decoded."""
        self.check_bytes(self.source_bytes(shape, stored_itemsize), f"loading shape {tuple(int(s) for s in shape)} "
                         f"of {int(stored_itemsize)}-byte samples", source)

    def resample_bytes(self, source_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        """Working bytes of resampling ``source_shape`` to ``output_shape`` and finishing the output."""
        src, out = _voxels(source_shape), _voxels(output_shape)
        return max(src * RESAMPLE_SOURCE_BYTES + out * RESAMPLE_OUTPUT_BYTES, out * FINISH_BYTES)

    def check_resample(self, source_shape: tuple[int, ...], output_shape: tuple[int, ...], source: str | None = None) -> None:
        """Before resampling: the output grid (e.g. 64^3 at 30 mm -> 1280^3 at 1.5 mm) must fit too."""
        self.check_bytes(self.resample_bytes(source_shape, output_shape),
                         f"resampling shape {tuple(int(s) for s in source_shape)} to "
                         f"{tuple(int(s) for s in output_shape)}", source)

    def max_inflated_bytes(self, declared_pixel_bytes: int) -> int:
        """Most bytes a Deflated DICOM may inflate to, given the pixel bytes its header declares."""
        return self.header_bytes + int(declared_pixel_bytes) + TRAILER_BYTES
