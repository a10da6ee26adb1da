"""MetaImage and NRRD: the real CT in each new format builds like its DICOM / NIfTI original; bad files are
rejected by name; unknown formats are ``unsupported_format``.

The new-format files are written by SimpleITK from SimpleITK's *own* reading of the originals (its GDCM
DICOM reader, its NIfTI reader), so the new readers are checked against the tested DICOM / NIfTI paths,
not against a conversion of ours.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mim_scale.shards import formats, itkimage
from mim_scale.shards.builder import build_shards
from mim_scale.shards.dicom import list_files
from mim_scale.shards.rejects import InputRejected
from mim_scale.shards.worker import WorkerSettings, WorkItem, build_volume

sitk = pytest.importorskip("SimpleITK")

SPACING_MM = 3.0  # coarser than the default: fast, and every axis is resampled
NEW_FORMATS = {  # file name -> compress
    "ct.mha": False, "ct.mhd": False, "ctz.mhd": True, "ct.nrrd": True, "ct.nhdr": False,
}


def _build(kind: str, files: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    return build_volume(WorkItem(0, "k" * 32, "d", kind, files, files[0]), WorkerSettings(spacing=SPACING_MM))


def _corners(meta: dict) -> np.ndarray:
    """(8, 3) RAS positions of the corner voxels of a built volume."""
    d, h, w = meta["shape"]
    ijk = np.asarray([[i, j, k, 1.0] for i in (0, w - 1) for j in (0, h - 1) for k in (0, d - 1)])
    return (np.asarray(meta["affine_ras"]) @ ijk.T).T[:, :3]


def _write_all(img, folder: Path) -> dict[str, Path]:
    out = {}
    for name, compress in NEW_FORMATS.items():
        sub = folder / name.replace(".", "_")
        sub.mkdir(parents=True)
        sitk.WriteImage(img, str(sub / name), useCompression=compress)
        out[name] = sub / name
    return out


@pytest.fixture(scope="module")
def dicom_reference(ct_dir, tmp_path_factory):
    """The real DICOM series: built through our DICOM path, and written in every new format by SimpleITK."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct_dir / "abdomen_dicom")))
    files = _write_all(reader.Execute(), tmp_path_factory.mktemp("from_dicom"))
    return _build("dicom", tuple(list_files(ct_dir / "abdomen_dicom"))), files


@pytest.fixture(scope="module")
def nifti_reference(ct_dir, tmp_path_factory):
    """The real NIfTI CT: our NIfTI path, and SimpleITK's reading of it written in every new format, once as
    read (LPS flips in the direction) and once with its axes permuted (z, x, y order on disk)."""
    src = ct_dir / "abdomen_pelvis_ct.nii.gz"
    img = sitk.ReadImage(str(src))
    folder = tmp_path_factory.mktemp("from_nifti")
    files = _write_all(img, folder / "as_read")
    permuted = sitk.PermuteAxes(img, [2, 0, 1])
    files |= {f"permuted {k}": v for k, v in _write_all(permuted, folder / "permuted").items()}
    return _build("nifti", (str(src),)), files


def _check_same(ref: tuple[np.ndarray, dict], path: Path) -> None:
    arr, meta = _build(itkimage.image_kind(path), (str(path),))
    ref_arr, ref_meta = ref
    assert meta["source_format"] == itkimage.image_kind(path)
    assert arr.shape == ref_arr.shape, path.name
    # the writer rounds HU to int16: equal within 1 HU, and here the paths agree exactly on nearly every voxel
    assert int(np.abs(arr.astype(np.int32) - ref_arr).max()) <= 1, path.name
    assert float(np.mean(arr != ref_arr)) < 1e-3, path.name
    np.testing.assert_allclose(meta["spacing"], ref_meta["spacing"])
    np.testing.assert_allclose(meta["direction"], ref_meta["direction"], atol=1e-6)
    np.testing.assert_allclose(_corners(meta), _corners(ref_meta), atol=1e-3)


@pytest.mark.parametrize("name", list(NEW_FORMATS))
def test_real_dicom_series_written_in_each_format_builds_the_same(dicom_reference, name):
    ref, files = dicom_reference
    assert ref[0].shape == (13, 167, 167) and ref[0].min() == -1024  # 20 slices x 2 mm, 512 x 0.977 mm at 3 mm
    _check_same(ref, files[name])


@pytest.mark.parametrize("name", [f"{p}{n}" for p in ("", "permuted ") for n in NEW_FORMATS])
def test_real_nifti_written_in_each_format_builds_the_same(nifti_reference, name):
    ref, files = nifti_reference
    _check_same(ref, files[name])


def test_new_formats_go_through_the_builder_beside_the_originals(dicom_reference, ct_dir, tmp_path):
    """One build of the DICOM original and its MetaImage / NRRD copies: one volume, the copies are duplicates
    of its exact voxels, the raw / zraw data files are not taken as inputs of their own."""
    _, files = dicom_reference
    inputs = [f"dicom={ct_dir / 'abdomen_dicom'}"] + [f"{p.suffix[1:]}{i}={p.parent}" for i, p in enumerate(files.values())]
    rep = build_shards(inputs, tmp_path / "out", workers=0, progress=False, spacing=SPACING_MM)
    assert rep.num_samples == 1 and rep.rejected == {"duplicate_content": len(files)}
    assert sum(rep.found.values()) == 1 + len(files)


def test_nrrd_in_ras_space_and_metaimage_rescale_build_like_the_plain_file(small_ct, tmp_path):
    """NRRD ``space: right-anterior-superior`` (3D Slicer) is the same grid as its LPS spelling; a MetaImage
    stored as half-HU with ``ElementToIntensityFunctionSlope = 2`` (which ITK itself ignores) gives HU."""
    vol = small_ct[:16]
    plain = write_itk(vol, tmp_path / "lps" / "v.nhdr")
    ras = tmp_path / "ras" / "v.nhdr"
    ras.parent.mkdir()
    shutil.copy(plain.with_suffix(".raw"), ras.with_suffix(".raw"))
    text = plain.read_text()
    for old, new in (("space: left-posterior-superior", "space: right-anterior-superior"),
                     ("space directions: (6,0,0) (0,6,0) (0,0,6)", "space directions: (-6,0,0) (0,-6,0) (0,0,6)"),
                     ("space origin: (10,-20,-300)", "space origin: (-10,20,-300)")):
        assert old in text, old
        text = text.replace(old, new)
    ras.write_text(text)
    ref_arr, ref_meta = _build("nrrd", (str(plain),))
    arr, meta = _build("nrrd", (str(ras),))
    np.testing.assert_array_equal(arr, ref_arr)
    assert meta["affine_ras"] == ref_meta["affine_ras"]

    even = write_itk((vol // 2 * 2).astype(np.int16), tmp_path / "even" / "v.mhd")
    half = write_itk((vol // 2).astype(np.int16), tmp_path / "half" / "v.mhd")
    _edit_header(half, "ElementType", "ElementToIntensityFunctionSlope = 2\nElementToIntensityFunctionOffset = 0\nElementType")
    ref2, _ = _build("metaimage", (str(even),))
    arr2, meta2 = _build("metaimage", (str(half),))
    np.testing.assert_array_equal(arr2, ref2)
    assert meta2["affine_ras"] == ref_meta["affine_ras"]


@pytest.mark.parametrize("suffix, dtype, offset", [
    (".nrrd", np.float32, 0), (".mha", np.float64, 0), (".nhdr", np.int32, 0), (".mhd", np.uint16, -1024)])
def test_integer_and_float_voxel_types_give_the_same_hu(small_ct, tmp_path, suffix, dtype, offset):
    """The same real-CT HU stored as float32 / float64 / int32, or as unsigned with an intensity offset (as
    scanners store CT), builds exactly like the int16 file."""
    vol = small_ct[:16]
    ref, ref_meta = _build("metaimage", (str(write_itk(vol, tmp_path / "ref" / "v.mha")),))
    path = write_itk((vol.astype(np.int32) - offset).astype(dtype), tmp_path / "typed" / f"v{suffix}")
    if offset:
        _edit_header(path, "ElementType", f"ElementToIntensityFunctionOffset = {offset}\nElementType")
    arr, meta = _build(itkimage.image_kind(path), (str(path),))
    np.testing.assert_array_equal(arr, ref)
    assert meta["affine_ras"] == ref_meta["affine_ras"]


# ---------------------------------------------------------------- bad inputs


def write_itk(vol: np.ndarray, path: Path, compress: bool = False) -> Path:
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((6.0, 6.0, 6.0))
    img.SetOrigin((10.0, -20.0, -300.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


def _mhd(folder: Path, vol: np.ndarray, name: str = "v.mhd") -> tuple[Path, Path]:
    path = write_itk(vol, folder / name)
    return path, path.with_suffix(".raw")


def _edit_header(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in the {path.name} SimpleITK wrote"
    path.write_text(text.replace(old, new))


def _bad_corpus(root: Path, vol: np.ndarray) -> dict[str, str]:
    """Folder -> expected reason; each folder holds one bad header (and its data)."""
    bad: dict[str, str] = {}
    nbytes = vol.size * 2
    h, raw = _mhd(root / "truncated_raw", vol)
    os.truncate(raw, nbytes // 2)
    bad["truncated_raw"] = "truncated"
    h, _ = _mhd(root / "claims_more_voxels", vol)
    d, hh, w = vol.shape
    _edit_header(h, f"DimSize = {w} {hh} {d}", f"DimSize = {w} {hh} {d + 4}")
    bad["claims_more_voxels"] = "truncated"
    h = write_itk(vol, root / "zraw_truncated" / "v.mhd", compress=True)
    zraw = h.with_suffix(".zraw")
    os.truncate(zraw, zraw.stat().st_size // 2)
    bad["zraw_truncated"] = "truncated"
    h = write_itk(vol, root / "nrrd_gzip_truncated" / "v.nrrd", compress=True)
    os.truncate(h, h.stat().st_size - 200)
    bad["nrrd_gzip_truncated"] = "truncated"
    # a complete compressed stream that holds fewer voxels than the header declares: ITK would fill the rest of
    # its buffer with whatever memory held (G's reproducer: a different last slice on every read)
    h = write_itk(vol, root / "mha_zlib_short_stream" / "v.mha", compress=True)
    data = h.read_bytes()
    assert f"DimSize = {vol.shape[2]} {vol.shape[1]} {vol.shape[0]}".encode() in data
    h.write_bytes(data.replace(f"DimSize = {vol.shape[2]} {vol.shape[1]} {vol.shape[0]}".encode(),
                               f"DimSize = {vol.shape[2]} {vol.shape[1]} {vol.shape[0] + 1}".encode(), 1))
    bad["mha_zlib_short_stream"] = "truncated"
    h = write_itk(vol, root / "zraw_short_stream" / "v.mhd", compress=True)
    _edit_header(h, f"DimSize = {vol.shape[2]} {vol.shape[1]} {vol.shape[0]}",
                 f"DimSize = {vol.shape[2]} {vol.shape[1]} {vol.shape[0] + 1}")
    bad["zraw_short_stream"] = "truncated"
    h = write_itk(vol, root / "nrrd_gzip_short_stream" / "v.nrrd", compress=True)
    data = h.read_bytes()
    h.write_bytes(data.replace(f"sizes: {vol.shape[2]} {vol.shape[1]} {vol.shape[0]}".encode(),
                               f"sizes: {vol.shape[2]} {vol.shape[1]} {vol.shape[0] + 1}".encode(), 1))
    bad["nrrd_gzip_short_stream"] = "truncated"
    h = write_itk(vol, root / "nhdr_truncated" / "v.nhdr")
    os.truncate(h.with_suffix(".raw"), nbytes - 2)
    bad["nhdr_truncated"] = "truncated"
    (root / "outside").mkdir()
    shutil.copy(raw.parent.parent / "claims_more_voxels" / "v.raw", root / "outside" / "v.raw")
    h, _ = _mhd(root / "dotdot", vol)
    _edit_header(h, "ElementDataFile = v.raw", "ElementDataFile = ../outside/v.raw")
    (h.parent / "v.raw").unlink()
    bad["dotdot"] = "unsafe_data_file"
    h = write_itk(vol, root / "nhdr_dotdot" / "v.nhdr")
    _edit_header(h, "data file: v.raw", "data file: ../outside/v.raw")
    (h.parent / "v.raw").unlink()
    bad["nhdr_dotdot"] = "unsafe_data_file"
    h, _ = _mhd(root / "absolute", vol)
    _edit_header(h, "ElementDataFile = v.raw", f"ElementDataFile = {root / 'outside' / 'v.raw'}")
    (h.parent / "v.raw").unlink()
    bad["absolute"] = "unsafe_data_file"
    h, raw2 = _mhd(root / "link_out", vol)
    raw2.unlink()
    raw2.symlink_to(root / "outside" / "v.raw")
    bad["link_out"] = "unsafe_data_file"
    h, raw3 = _mhd(root / "missing_data", vol)
    raw3.unlink()
    bad["missing_data"] = "missing_data_file"
    h, _ = _mhd(root / "unknown_type", vol)
    _edit_header(h, "MET_SHORT", "MET_FLOAT16")
    bad["unknown_type"] = "unsupported_data_type"
    h = write_itk(vol, root / "nrrd_block" / "v.nhdr")
    _edit_header(h, "type: short", "type: block")
    bad["nrrd_block"] = "unsupported_data_type"
    h, _ = _mhd(root / "vector", vol)
    _edit_header(h, "ElementType", "ElementNumberOfChannels = 3\nElementType")
    bad["vector"] = "unsupported_data_type"
    h, _ = _mhd(root / "list", vol)
    _edit_header(h, "ElementDataFile = v.raw", "ElementDataFile = LIST")
    (h.parent / "v.raw").unlink()
    bad["list"] = "unsupported_format"
    h, _ = _mhd(root / "huge", vol)
    _edit_header(h, f"DimSize = {w} {hh} {d}", "DimSize = 100000 100000 100000")
    bad["huge"] = "too_large"
    h, _ = _mhd(root / "wraps_int64", vol)  # 2^31 per axis as ITK reads it: the product overflows an int64
    _edit_header(h, f"DimSize = {w} {hh} {d}", "DimSize = 4294967296 4294967296 4294967296")
    bad["wraps_int64"] = "too_large"
    (root / "endless").mkdir()
    (root / "endless" / "v.mha").write_text("ObjectType = Image\n" + "Comment = x\n" * 8000)
    bad["endless"] = "bad_header"
    (root / "not_nrrd").mkdir()
    (root / "not_nrrd" / "v.nrrd").write_bytes(np.random.default_rng(0).bytes(3000))
    bad["not_nrrd"] = "bad_header"
    h, _ = _mhd(root / "sheared", vol)
    _edit_header(h, "TransformMatrix = 1 0 0 0 1 0 0 0 1", "TransformMatrix = 1 0 0 0.5 1 0 0 0 1")
    bad["sheared"] = "sheared_affine"
    return bad


@pytest.fixture(scope="module")
def bad_root(small_ct, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad_itk")
    return root, _bad_corpus(root, small_ct[:8])


def test_each_bad_header_is_rejected_with_its_reason_before_building(bad_root):
    root, bad = bad_root
    got = {}
    for name in bad:
        header = next(p for p in sorted((root / name).iterdir()) if itkimage.image_kind(p))
        with pytest.raises(InputRejected) as exc:
            itkimage.load_itk(str(header), max_voxels=1 << 30)
        got[name] = exc.value.reason
        assert exc.value.source == str(header) and exc.value.detail
    assert got == bad


def test_bad_files_and_unknown_formats_in_a_build(bad_root, small_ct, tmp_path):
    """Through the builder: every bad header is a named reject, the good volume beside them builds, and a file
    of no supported format is ``unsupported_format`` naming what it is and what is read (never ``not_dicom``)."""
    root, bad = bad_root
    inp = tmp_path / "in"
    shutil.copytree(root, inp, symlinks=True)
    write_itk(small_ct[8:16], inp / "good" / "v.nrrd")
    (inp / "misc").mkdir()
    (inp / "misc" / "notes.xyz").write_text("a list of scans\n" * 20)
    shutil.make_archive(str(inp / "misc" / "subset0"), "zip", inp / "good")
    (inp / "misc" / "orphan.raw").write_bytes(bytes(1000))
    rep = build_shards([f"bad={inp}"], tmp_path / "out", workers=0, progress=False, spacing=6.0)
    assert rep.num_samples == 1
    rejects = [json.loads(line) for line in (tmp_path / "out.private" / "rejects.jsonl").read_text().splitlines()]
    by_folder = {}
    for r in rejects:
        rel = Path(r["source"]).relative_to(inp)
        by_folder.setdefault(rel.parts[0], set()).add(r["reason"])
    for name, reason in bad.items():
        assert by_folder.pop(name) == {reason}, name
    misc = {Path(r["source"]).name: r for r in rejects if r["source"].startswith(str(inp / "misc"))}
    assert {k: v["reason"] for k, v in misc.items()} == {
        "notes.xyz": "unsupported_format", "subset0.zip": "unsupported_format", "orphan.raw": "unsupported_format"}
    assert "plain text" in misc["notes.xyz"]["detail"] and "zip archive" in misc["subset0.zip"]["detail"]
    assert all(formats.SUPPORTED in r["detail"] for r in misc.values())
    # the data files of the bad headers are read with their headers, never reported on their own
    assert not any(r["source"].endswith((".raw", ".zraw")) and "misc" not in r["source"] for r in rejects)
