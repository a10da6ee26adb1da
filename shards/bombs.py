"""The bomb corpus: small files that declare, inflate or resample to far more memory than a worker has.

For the tests (every bomb is rejected with its reason) and for ``python benchmarks/shard_memory.py``
(peak resident memory of a build over them). Every file is a few MB on disk; what each would take if
it were read naively is in ``BOMBS``. Deflate streams of zeros are made by repeating one compressed,
fully flushed block, so a 8 GiB stream costs milliseconds to make (the gzip CRC of such a stream is
left 0: nothing that reads within the caps gets to it).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from mim_scale.shards.synth import phantom, write_dicom_series

_BLOCK = 1 << 20

# name -> (reason the build must give, what a naive read would allocate)
BOMBS: dict[str, tuple[str, str]] = {
    "deflate_declared": ("too_large", "Deflated DICOM declaring 32768x32768 16-bit pixels; stream inflates to 2 GiB"),
    "deflate_trailer": ("too_large", "Deflated DICOM of 64x64 pixels followed by 1 GiB of padding in the stream"),
    "deflate_header": ("too_large", "Deflated DICOM with a 1 GiB private element before its pixel data"),
    "late_file_dims": ("too_large", "series whose 5th file (Deflated) declares 40000x40000 pixels, 3 GiB inflated"),
    "resample_nifti": ("too_large", "64^3 NIfTI at 30 mm: 1261^3 voxels at 1.5 mm (2 Gvoxel, 8 GiB float32)"),
    "resample_dicom": ("too_large", "16 slices of 64x64 at 30 mm: 301x1261x1261 at 1.5 mm"),
    "float64_gvoxel": ("too_large", "NIfTI of 1024^3 float64 (8 GiB), all in its gzip stream"),
    "vox_offset": ("invalid_header", "NIfTI whose vox_offset is 2 GiB, all zeros in its gzip stream"),
}


def _zeros_deflate(nbytes: int) -> bytes:
    """Raw deflate blocks (not final) that inflate to ``nbytes`` zeros (a multiple of 1 MiB plus a rest)."""
    block = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    one = block.compress(bytes(_BLOCK)) + block.flush(zlib.Z_FULL_FLUSH)
    rest = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    tail = rest.compress(bytes(nbytes % _BLOCK)) + rest.flush(zlib.Z_FULL_FLUSH)
    return one * (nbytes // _BLOCK) + tail


def deflate_parts(parts: list[bytes | int]) -> bytes:
    """One raw deflate stream of ``parts``: bytes as they are, an int n as n zero bytes (cheaply)."""
    out = []
    for part in parts:
        if isinstance(part, int):
            out.append(_zeros_deflate(part))
        else:
            c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            out.append(c.compress(part) + c.flush(zlib.Z_FULL_FLUSH))
    end = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.append(end.flush(zlib.Z_FINISH))  # an empty final block
    return b"".join(out)


def _gzip_parts(parts: list[bytes | int]) -> bytes:
    """A gzip member around ``deflate_parts(parts)`` (CRC left 0, ISIZE right modulo 2**32)."""
    size = sum(p if isinstance(p, int) else len(p) for p in parts)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + deflate_parts(parts) + struct.pack("<II", 0, size & 0xFFFFFFFF)


def _element(tag: int, vr: bytes, length: int) -> bytes:
    """Explicit VR little endian header of an OB/OW element of ``length`` bytes."""
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + b"\0\0" + struct.pack("<I", length)


def write_deflated_dicom(src: Path, dst: Path, *, rows: int | None = None, cols: int | None = None,
                         before_pixels: int = 0, pixel_zeros: int | None = None, after_pixels: int = 0,
                         series_uid: str | None = None) -> Path:
    """Copy the single-frame DICOM ``src`` to ``dst`` as Deflated Explicit VR Little Endian.

    rows/cols: declared size (default: as ``src``); before_pixels: a private OB element of that many zero
    bytes before the pixel data; pixel_zeros: the pixel data as that many zeros (default: ``src``'s pixels);
    after_pixels: DataSetTrailingPadding of that many zero bytes after them; series_uid: a new one by default.
    """
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = pydicom.dcmread(src)
    pixels = bytes(ds.PixelData)
    del ds.PixelData
    if rows is not None:
        ds.Rows = rows
    if cols is not None:
        ds.Columns = cols
    ds.SeriesInstanceUID = series_uid or pydicom.uid.generate_uid()

    def encode(d: pydicom.Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, d)
        return fp.getvalue()

    low, high = pydicom.Dataset(), pydicom.Dataset()
    for elem in ds:
        (low if elem.tag < 0x00090000 else high).add(elem)
    parts: list[bytes | int] = [encode(low)]
    if before_pixels:
        parts += [encode(_private_creator()), _element(0x00091000, b"OB", before_pixels), before_pixels]
    parts.append(encode(high))
    if pixel_zeros is None:
        parts += [_element(0x7FE00010, b"OW", len(pixels)), pixels]
    else:
        parts += [_element(0x7FE00010, b"OW", pixel_zeros), pixel_zeros]
    if after_pixels:
        parts += [_element(0xFFFCFFFC, b"OB", after_pixels), after_pixels]
    meta = ds.file_meta
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(b"\0" * 128 + b"DICM" + fp.getvalue() + deflate_parts(parts))
    return dst


def _private_creator():
    import pydicom

    d = pydicom.Dataset()
    d.add_new(0x00090010, "LO", "MIM BOMB")
    return d


def _nifti_header(shape: tuple[int, int, int], dtype: type, spacing: float, vox_offset: int | None = None) -> bytes:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.diag([-spacing, -spacing, spacing, 1.0]), code=2)
    hdr.set_qform(np.diag([-spacing, -spacing, spacing, 1.0]), code=2)
    hdr.set_xyzt_units("mm")
    hdr["vox_offset"] = 352 if vox_offset is None else vox_offset
    return hdr.binaryblock + b"\0" * 4


def make_bomb_corpus(root: Path) -> dict[str, Path]:
    """Write every bomb of ``BOMBS`` under ``root`` -> name -> the input path (a file or a series folder)."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    vol = phantom((16, 64, 64), seed=7)
    series = write_dicom_series(vol, root / "_template", spacing=(30.0, 30.0, 30.0))
    out["deflate_declared"] = write_deflated_dicom(series[0], root / "deflate_declared" / "a.dcm", rows=32768,
                                                   cols=32768, pixel_zeros=32768 * 32768 * 2).parent
    out["deflate_trailer"] = write_deflated_dicom(series[0], root / "deflate_trailer" / "a.dcm",
                                                  after_pixels=1 << 30).parent
    out["deflate_header"] = write_deflated_dicom(series[0], root / "deflate_header" / "a.dcm",
                                                 before_pixels=1 << 30).parent
    late, uid = root / "late_file_dims", "1.2.826.0.1.3680043.8.498.1"
    for k in range(4):
        write_deflated_dicom(series[k], late / f"s{k}.dcm", series_uid=uid)
    write_deflated_dicom(series[4], late / "s4.dcm", rows=40000, cols=40000, pixel_zeros=40000 * 40000 * 2,
                         series_uid=uid)
    out["late_file_dims"] = late
    import shutil

    shutil.move(str(root / "_template"), str(root / "resample_dicom"))  # 16 slices at 30 mm
    out["resample_dicom"] = root / "resample_dicom"
    cube = phantom((64, 64, 64), seed=8).transpose(2, 1, 0).astype(np.int16)
    small = root / "resample_nifti.nii.gz"
    small.write_bytes(gzip.compress(_nifti_header((64, 64, 64), np.int16, 30.0) + cube.tobytes(order="F"), 1))
    out["resample_nifti"] = small
    big = root / "float64_gvoxel.nii.gz"
    big.write_bytes(_gzip_parts([_nifti_header((1024, 1024, 1024), np.float64, 1.0), 8 << 30]))
    out["float64_gvoxel"] = big
    off = root / "vox_offset.nii.gz"
    data = phantom((32, 32, 32), seed=9).astype(np.int16).tobytes()
    off.write_bytes(_gzip_parts([_nifti_header((32, 32, 32), np.int16, 1.0, vox_offset=2 << 30), (2 << 30) - 352, data]))
    out["vox_offset"] = off
    return out
