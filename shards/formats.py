"""Which reader takes a file, by name; and what an unknown file looks like, for its ``unsupported_format`` reject.

Files with a NIfTI / MetaImage / NRRD suffix go to their readers; every other file goes to DICOM
discovery (DICOM files often have no suffix at all). A file DICOM discovery cannot parse is
``not_dicom`` only when it looks like DICOM (a ``.dcm``-like suffix, the ``DICM`` preamble, or a
group-0008 start); anything else is ``unsupported_format`` naming what was found and what is read.
"""

from __future__ import annotations

import os
from pathlib import Path

from mim_scale.shards import itkimage
from mim_scale.shards.nifti import is_nifti

SUPPORTED = ("DICOM (files or folders of series), NIfTI (.nii, .nii.gz), MetaImage (.mha, or .mhd + its data file), "
             "NRRD (.nrrd, or .nhdr + its data file)")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dic")

# leading bytes -> what the file is, for the reject detail
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data"), (b"PK\x03\x04", "a zip archive (unpack it first)"),
    (b"BZh", "bzip2-compressed data"), (b"\xfd7zXZ", "xz-compressed data"), (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"<?xml", "XML text"), (b"\x89HDF", "an HDF5 file"),
    (b"\x93NUMPY", "a NumPy array file"), (b"NRRD", "NRRD data under another suffix"),
)


def file_kind(path: str | Path) -> str:
    """``"nifti"`` | ``"metaimage"`` | ``"nrrd"`` by suffix, else ``"other"`` (DICOM discovery decides)."""
    if is_nifti(path):
        return "nifti"
    return itkimage.image_kind(path) or "other"


def _head(path: str, n: int = 132) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def looks_like_dicom(path: str) -> bool:
    """A DICOM-like suffix, the ``DICM`` magic at byte 128, or a stream starting with group 0008."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return True
    head = _head(path)
    return head[128:132] == b"DICM" or head[:2] in (b"\x08\x00", b"\x00\x08")


def describe(path: str) -> str:
    """What a file of an unknown format looks like (suffix and content sniff), for a reject detail."""
    suffix = "".join(Path(path).suffixes[-2:]).lower() or "no suffix"
    head = _head(path, 512)
    what = next((text for magic, text in _MAGIC if head.startswith(magic)), None)
    if what is None:
        if head.lstrip().startswith(b"<"):
            what = "XML/HTML text"
        elif head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            what = "plain text"
        else:
            what = "binary data of no known kind"
    return f"found {what} ({suffix}); supported: {SUPPORTED}"


def refine_not_dicom(path: str, reason: str, detail: str) -> tuple[str, str]:
    """DICOM discovery's ``not_dicom`` for a file that does not look like DICOM -> ``unsupported_format``."""
    if reason != "not_dicom" or looks_like_dicom(path):
        return reason, detail
    return "unsupported_format", describe(path)


def claimed_data_files(headers: list[str]) -> set[str]:
    """Resolved data files named by MetaImage / NRRD headers (so they are not taken as unknown files)."""
    out = set()
    for h in headers:
        data = itkimage.data_file_of(h)
        if data is not None:
            out.add(os.path.realpath(data))
    return out
