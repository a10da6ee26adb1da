"""CT collections (DICOM trees, NIfTI) -> verified, de-identified WebDataset shards, built on Ray.

Public API: :func:`build_shards` (-> :class:`BuildReport`), :class:`InputSpec`, :class:`BuildConfig`;
readers :func:`read_manifest` and :func:`decode_sample`; :func:`verify_shards`. The format is documented
in :mod:`mim_scale.shards.format` and ``shards/README.md``. Imports are lazy so that readers (the training
stream) do not pull in pydicom, scipy or Ray.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "build_shards": "mim_scale.shards.builder",
    "BuildReport": "mim_scale.shards.builder",
    "BuildConfig": "mim_scale.shards.builder",
    "InputSpec": "mim_scale.shards.inputs",
    "read_manifest": "mim_scale.shards.format",
    "decode_sample": "mim_scale.shards.format",
    "verify_shards": "mim_scale.shards.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mim_scale.shards' has no attribute {name!r}")
