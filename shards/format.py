"""The shard format: what a sample and a manifest are, and how to read them back.

Format ``mim-scale-shards`` version 1.

A shard is a plain (ustar) tar file, readable by WebDataset, holding samples in order. Each sample is two
members sharing one key (the de-identified, salted hash of its source; lowercase hex, no dots):

``<key>.npy.gz`` (or ``<key>.npy``)
    The CT volume in Hounsfield units, ``int16``, C order, shape ``(D, H, W)``, as an ``.npy`` file
    (plain by default, so the stream can memory-map it; gzip-wrapped with ``codec="npy.gz"``, lossless, see ``BuildConfig.codec``).

``<key>.json``
    UTF-8 JSON metadata (see :func:`sample_meta_fields`).

Geometry convention (the same as ITK / SimpleITK, in the DICOM patient frame LPS+):

* array axes ``(D, H, W)`` = ``(z, y, x)``: ``W`` runs towards patient Left, ``H`` towards Posterior,
  ``D`` towards Superior (up to a small residual rotation for oblique scans, kept in ``direction``);
* ``spacing`` is ``[sx, sy, sz]`` in mm, i.e. in ``(W, H, D)`` order, like ITK;
* ``origin`` is the LPS position (mm) of the centre of voxel ``[0, 0, 0]``;
* ``direction`` is the 3x3 direction cosine matrix, row-major, whose columns are the LPS directions of
  the ``W``, ``H``, ``D`` axes (identity for the canonical orientation of an axial scan);
* the LPS position of voxel ``array[k, j, i]`` is ``origin + direction @ (spacing * [i, j, k])``;
* ``affine_ras`` is the 4x4 NIfTI affine (RAS+) for ``array.transpose(2, 1, 0)``, so
  ``nibabel.Nifti1Image(vol.transpose(2, 1, 0), meta["affine_ras"])`` writes the volume back exactly on its
  grid; ``SimpleITK.GetImageFromArray(vol)`` with ``SetSpacing/SetOrigin/SetDirection`` does the same.

The manifest (``manifest.json`` beside the shards) lists the shards with their relative ``url``, sample
count, byte size and sha256, per-dataset counts, the build config and the software versions. It carries
no timestamps, so rebuilding the same inputs gives a byte-identical manifest.
"""

from __future__ import annotations

import gzip
import io
import json
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mim_scale.errors import UserFacingError

FORMAT_NAME = "mim-scale-shards"
FORMAT_VERSION = 1
AXIS_ORDER = "zyx"  # array axes (D, H, W)
DTYPE = "int16"
HU_MIN = -1024
HU_MAX = 3071
CODECS = ("npy.gz", "npy")
MANIFEST_NAME = "manifest.json"
# a decompressed volume larger than this is refused (guards against gzip bombs in foreign shards)
MAX_DECODED_BYTES = 4 << 30


def encode_volume(volume: np.ndarray, codec: str, level: int = 1) -> bytes:
    """volume: (D, H, W) int16 -> bytes of the ``.npy`` (``codec="npy"``) or ``.npy.gz`` member.

    Deterministic: the same array always gives the same bytes (gzip header mtime is 0).
    """
    if volume.dtype != np.int16 or volume.ndim != 3:
        raise ValueError(f"expected a 3D int16 volume, got {volume.dtype} {volume.shape}")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(volume), version=(1, 0), allow_pickle=False)
    raw = buf.getvalue()
    if codec == "npy":
        return raw
    if codec == "npy.gz":
        return gzip.compress(raw, compresslevel=level, mtime=0)
    raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it (its ``shards`` entries): what the builder records when it closes a
    shard and what the stream reads back. ``sha256`` and ``bytes`` bound and check a whole-shard read ("" / 0:
    unknown); ``index`` is the shard's position in its build (the journal checks it; 0 when read from a
    manifest)."""

    url: str
    samples: int
    datasets: dict[str, int] = dataclasses.field(default_factory=dict)
    sha256: str = ""
    bytes: int = 0
    index: int = 0


def decode_volume(data: bytes, codec: str) -> np.ndarray:
    """Bytes of a ``.npy`` / ``.npy.gz`` member -> (D, H, W) int16 array. Never unpickles."""
    if codec == "npy.gz":
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
            data = gz.read(MAX_DECODED_BYTES + 1)
        if len(data) > MAX_DECODED_BYTES:
            raise ValueError("decoded volume exceeds the 4 GiB limit")
    elif codec != "npy":
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype != np.int16 or arr.ndim != 3:
        raise ValueError(f"sample volume must be 3D int16, got {arr.dtype} {arr.shape}")
    return arr


def decode_sample(sample: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """One WebDataset sample (extension -> raw bytes) -> ((D, H, W) int16 HU volume, metadata dict).

    Accepts the raw dict from ``webdataset.WebDataset(...)`` without ``.decode()``: keys ``"npy.gz"`` or
    ``"npy"`` and ``"json"`` (``"__key__"`` and other extras are ignored). The JSON may already be a
    dict (if a decoder ran) and the volume may already be an array.
    """
    meta_raw = sample.get("json")
    if meta_raw is None:
        raise ValueError(f"sample {sample.get('__key__', '?')} has no .json member")
    meta = meta_raw if isinstance(meta_raw, dict) else json.loads(meta_raw)
    for codec in CODECS:
        if codec in sample:
            value = sample[codec]
            vol = value if isinstance(value, np.ndarray) else decode_volume(value, codec)
            break
    else:
        raise ValueError(f"sample {sample.get('__key__', '?')} has no .npy or .npy.gz member")
    if list(vol.shape) != list(meta.get("shape", vol.shape)):
        raise ValueError(f"sample {meta.get('key')}: array shape {vol.shape} != meta shape {meta['shape']}")
    return vol, meta


def sample_meta_fields() -> tuple[str, ...]:
    """Keys every ``<key>.json`` carries."""
    return (
        "key", "dataset", "source_format", "shape", "axis_order", "dtype", "spacing", "origin",
        "direction", "affine_ras", "hu_stats", "content_sha256", "format", "version",
    )


def affine_ras(spacing: Any, origin: Any, direction: Any) -> list[list[float]]:
    """ITK geometry (LPS, spacing in (W, H, D) order) -> 4x4 RAS affine for ``array.transpose(2, 1, 0)``."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d @ np.diag(np.asarray(spacing, dtype=np.float64))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return (flip @ lps).tolist()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a manifest: ``path`` is ``manifest.json`` or the folder holding it.

    Returns the manifest dict with an extra key ``"root"`` (the folder, as a string), so that
    ``Path(m["root"]) / shard["url"]`` is each shard's path.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise UserFacingError(f"{p}: no shard manifest here (build one with `mim-scale shards build`)")
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserFacingError(f"{p}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserFacingError(f"{p}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserFacingError(
            f"{p}: manifest version {manifest.get('version')} is not supported (this reader knows {FORMAT_VERSION})"
        )
    for i, shard in enumerate(manifest.get("shards", [])):
        for field in ("url", "samples", "bytes", "sha256"):
            if field not in shard:
                raise UserFacingError(f"{p}: shard entry {i} lacks {field!r}")
    manifest["root"] = str(p.parent)
    return manifest


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Canonical serialisation: sorted keys, fixed indent, trailing newline."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")
