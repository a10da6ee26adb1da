"""NIfTI headers are checked field by field: broken geometry (voxel sizes, qform/sform codes, affines that disagree
or degenerate), dims, datatype, vox_offset, units and scaling are rejected with the reason and the field named.
Every input is a crop of the real abdomen/pelvis CT with its own header, one field broken at a time."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mim_scale.shards.nifti import load_nifti
from mim_scale.shards.rejects import InputRejected


@pytest.fixture(scope="module")
def real(ct_dir) -> tuple[nib.Nifti1Header, np.ndarray]:
    """(the real file's header, a 40x40x40 crop of its int32 voxels in (i, j, k) order)."""
    img = nib.load(str(ct_dir / "abdomen_pelvis_ct.nii.gz"))
    data = np.asanyarray(img.dataobj)[40:80, 30:70, 40:80]
    hdr = img.header.copy()
    hdr.set_data_shape(data.shape)
    hdr["vox_offset"] = 352
    return hdr, np.ascontiguousarray(data)


def _write(path: Path, hdr: nib.Nifti1Header, data: np.ndarray) -> str:
    """The header's bytes exactly as set (nibabel would repair some fields on save), then the data."""
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + data.tobytes(order="F"))  # int32, as the real file stores them
    return str(path)


def _rotated_sform(h):
    a = h.get_sform().copy()
    a[:3, :3] = a[:3, [1, 0, 2]]  # swap the first two axes: qform and sform now describe different grids
    h.set_sform(a, code=2)


def _sform_col(h, col, value):
    a = h.get_sform().copy()
    a[:3, col] = value
    h["srow_x"], h["srow_y"], h["srow_z"] = a[0], a[1], a[2]


def _field(name, value):
    def edit(h):
        h[name] = value
    return edit


def _qform_too(h):
    h.set_qform(h.get_sform(), code=1)


def _all(*edits):
    def edit(h):
        for e in edits:
            e(h)
    return edit


# name -> (edit of the header, expected reason, text the detail names)
BROKEN = {
    "pixdim_zero": (_all(_qform_too, _field("sform_code", 0), lambda h: h.__setitem__("pixdim", [1, 0, 3, 3, 1, 1, 1, 1])),
                    "absurd_spacing", "pixdim[1:4]"),
    "pixdim_nan": (lambda h: h.__setitem__("pixdim", [1, 3, math.nan, 3, 1, 1, 1, 1]), "absurd_spacing", "pixdim[1:4]"),
    "pixdim_negative": (lambda h: h.__setitem__("pixdim", [1, 3, 3, -3, 1, 1, 1, 1]), "absurd_spacing", "pixdim[1:4]"),
    "no_orientation": (_all(_field("qform_code", 0), _field("sform_code", 0)), "missing_orientation", "both 0"),
    "code_out_of_range": (_field("sform_code", 9), "missing_orientation", "qform_code/sform_code"),
    "qform_sform_disagree": (_all(_qform_too, _rotated_sform), "inconsistent_geometry", "qform/sform"),
    "qform_sform_offset": (_all(_qform_too, _field("qoffset_x", 50.0)), "inconsistent_geometry", "qform/sform"),
    "pixdim_vs_sform": (lambda h: h.__setitem__("pixdim", [1, 1, 1, 1, 1, 1, 1, 1]), "inconsistent_geometry", "pixdim"),
    "sform_zero_column": (lambda h: _sform_col(h, 1, 0.0), "absurd_spacing", "sform"),
    "sform_nan": (lambda h: _sform_col(h, 2, math.nan), "sheared_affine", "not finite"),
    "sform_sheared": (lambda h: _sform_col(h, 1, [1.5, 3.0, 0.0]), "sheared_affine", "orthogonal"),
    "quaternion_not_rotation": (_all(_qform_too, _field("quatern_b", 0.9), _field("quatern_c", 0.9)), "invalid_header", "quatern"),
    "qfac": (_all(_qform_too, lambda h: h.__setitem__("pixdim", [0.5, 3, 3, 3, 1, 1, 1, 1])), "invalid_header", "pixdim[0]"),
    "bitpix": (_field("bitpix", 16), "invalid_header", "bitpix"),
    "dim0": (lambda h: h.__setitem__("dim", [9, 40, 40, 40, 1, 1, 1, 1]), "invalid_header", "dim[0]"),
    "dim_negative": (lambda h: h.__setitem__("dim", [3, 40, -40, 40, 1, 1, 1, 1]), "invalid_header", "dim"),
    "vox_offset_low": (_field("vox_offset", 0), "invalid_header", "vox_offset"),
    "vox_offset_fraction": (_field("vox_offset", 352.5), "invalid_header", "vox_offset"),
    "units": (_field("xyzt_units", 4), "invalid_header", "xyzt_units"),
    "intercept": (_all(_field("scl_slope", 1.0), _field("scl_inter", math.inf)), "invalid_header", "scl_inter"),
    "magic": (_field("magic", b"ni1"), "invalid_header", "magic"),
    "datatype": (_field("datatype", 9999), "invalid_header", "datatype"),
    "complex": (_all(_field("datatype", 32), _field("bitpix", 64)), "invalid_header", "datatype"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_header_is_rejected_with_the_field_named(name, real, tmp_path):
    hdr, data = real
    edit, reason, named = BROKEN[name]
    h = hdr.copy()
    edit(h)
    path = _write(tmp_path / f"{name}.nii", h, data)
    with pytest.raises(InputRejected) as exc:
        load_nifti(path)
    assert (exc.value.reason, exc.value.source) == (reason, path)
    assert named in exc.value.detail, exc.value.detail


def test_the_unbroken_crop_and_the_real_file_load(real, tmp_path, ct_dir):
    hdr, data = real
    vol = load_nifti(_write(tmp_path / "ok.nii", hdr.copy(), data))
    assert vol.array.shape == data.shape[::-1] and vol.spacing == (3.0, 3.0, 3.0)
    assert np.array_equal(vol.array, data.transpose(2, 1, 0).astype(np.float32))
    full = load_nifti(str(ct_dir / "abdomen_pelvis_ct.nii.gz"))  # scl_slope NaN, units unknown: both normal
    assert full.array.shape == (112, 101, 122)


def test_units_in_meters_are_converted_to_mm(real, tmp_path):
    hdr, data = real
    h = hdr.copy()
    h.set_sform(np.diag([0.003, 0.003, 0.003, 1.0]), code=2)
    h["pixdim"] = [1, 0.003, 0.003, 0.003, 1, 1, 1, 1]
    h.set_xyzt_units("meter")
    vol = load_nifti(_write(tmp_path / "m.nii", h, data))
    assert np.allclose(vol.spacing, 3.0)
