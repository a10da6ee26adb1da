"""The shard builder on the real CT: DICOM assembly against SimpleITK, geometry, labels, round trip."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from mim_scale.shards.builder import build_shards
from mim_scale.shards.dicom import list_files, load_series
from mim_scale.shards.format import decode_sample, read_manifest
from mim_scale.shards.geometry import Volume, canonicalize
from mim_scale.shards.verify import iter_shard_samples, verify_shards
from mim_scale.shards.worker import WorkerSettings, WorkItem, build_volume

# mean HU of these organs in this scan (../shared/data/README.md)
EXPECTED_HU = {"liver": 89.0, "spleen": 80.0, "aorta": 177.0}


def _sitk_volume(folder: Path):
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = sitk.DICOMOrient(reader.Execute(), "LPS")
    return sitk.GetArrayFromImage(img), img


def _samples(out: Path) -> list[tuple[np.ndarray, dict]]:
    m = read_manifest(out)
    return [decode_sample(s) for shard in m["shards"] for s in iter_shard_samples(Path(m["root"]) / shard["url"])]


@pytest.fixture(scope="module")
def dicom_build(ct_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "out"
    build_shards([f"abdomen={ct_dir / 'abdomen_dicom'}"], out, workers=0, progress=False)
    return out


def test_dicom_series_matches_simpleitk_voxel_for_voxel(ct_dir):
    files = list_files(ct_dir / "abdomen_dicom")
    vol = canonicalize(load_series(files))
    ref, img = _sitk_volume(ct_dir / "abdomen_dicom")
    assert vol.array.shape == ref.shape == (20, 512, 512)
    np.testing.assert_array_equal(vol.array, ref.astype(np.float32))
    np.testing.assert_allclose(vol.spacing, img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(vol.origin, img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.direction.ravel(), img.GetDirection(), atol=1e-6)
    assert vol.array.min() == -1024 and vol.array.max() == 1839  # RescaleIntercept -1024 applied


def test_voxel_zero_is_the_first_slice_corner_after_resampling(ct_dir):
    files = list_files(ct_dir / "abdomen_dicom")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ipps = np.asarray([[float(v) for v in h.ImagePositionPatient] for h in headers])
    iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    first = ipps[np.argmin(ipps @ normal)]
    # canonical LPS: voxel (0,0,0) is the corner with the smallest L, P and S coordinates
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    ps = [float(v) for v in headers[0].PixelSpacing]
    corners = [first + a * (cols - 1) * ps[1] * iop[:3] + b * (rows - 1) * ps[0] * iop[3:] for a in (0, 1) for b in (0, 1)]
    expected = np.min(np.asarray(corners), axis=0)

    item = WorkItem(0, "k" * 32, "abdomen", "dicom", tuple(files), "src")
    arr, meta = build_volume(item, WorkerSettings(spacing=1.5))
    assert meta["spacing"] == [1.5, 1.5, 1.5]
    np.testing.assert_allclose(meta["origin"], expected, atol=1e-3)
    aff = np.asarray(meta["affine_ras"])
    np.testing.assert_allclose(aff @ [0, 0, 0, 1], [-expected[0], -expected[1], expected[2], 1], atol=1e-3)
    # the grid spans the source extent: 19 gaps of 2 mm -> 38 mm -> 26 slices at 1.5 mm
    assert arr.shape == (26, 333, 333)
    # a voxel far from the corner lands where the source has the same anatomy
    src = canonicalize(load_series(files))
    k, j, i = 13, 200, 170
    world = Volume(arr, meta["spacing"], meta["origin"], np.asarray(meta["direction"]).reshape(3, 3)).index_to_world(np.asarray([[k, j, i]]))[0]
    sijk = np.linalg.solve(src.direction @ np.diag(src.spacing), world - np.asarray(src.origin))
    si, sj, sk = np.rint(sijk).astype(int)
    patch = src.array[sk - 1:sk + 2, sj - 1:sj + 2, si - 1:si + 2]
    assert patch.min() - 30 <= arr[k, j, i] <= patch.max() + 30


def test_shuffled_instance_numbers_and_file_names_sort_by_position(ct_dir, tmp_path):
    src = ct_dir / "abdomen_dicom"
    files = list_files(src)
    rng = random.Random(7)
    numbers = list(range(1, len(files) + 1))
    rng.shuffle(numbers)
    names = [f"x{rng.randrange(10**8):08d}" for _ in files]
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for f, n, name in zip(files, numbers, names):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = n
        ds.save_as(shuffled / name)
    a = canonicalize(load_series(list_files(src)))
    b = canonicalize(load_series(list_files(shuffled)))
    np.testing.assert_array_equal(a.array, b.array)
    assert a.origin == b.origin


def test_labels_on_the_built_grid_give_the_organ_mean_hu(ct_dir, dicom_build):
    (vol, meta), = _samples(dicom_build)
    names = json.loads((ct_dir / "labels_total.json").read_text())
    ids = {name: int(k) for k, name in names.items() if name in EXPECTED_HU}
    assert ids == {"liver": 5, "spleen": 1, "aorta": 52}
    lab_img = nib.load(str(ct_dir / "abdomen_dicom_labels.nii.gz"))
    labels = np.asarray(lab_img.dataobj)
    # every built voxel centre -> RAS world -> label voxel (nearest neighbour)
    d, h, w = vol.shape
    k, j, i = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    vox = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    world_ras = np.asarray(meta["affine_ras"]) @ vox
    lab_vox = np.rint(np.linalg.inv(lab_img.affine) @ world_ras)[:3].astype(int)
    inside = np.all((lab_vox >= 0) & (lab_vox < np.asarray(labels.shape)[:, None]), axis=0)
    carried = np.zeros(vol.size, dtype=labels.dtype)
    carried[inside] = labels[lab_vox[0, inside], lab_vox[1, inside], lab_vox[2, inside]]
    carried = carried.reshape(vol.shape)
    for name, label in ids.items():
        mask = carried == label
        assert mask.sum() > 100, name
        mean = float(vol[mask].mean())
        assert abs(mean - EXPECTED_HU[name]) <= 15.0, f"{name}: mean {mean:.1f} HU, expected ~{EXPECTED_HU[name]}"


def test_shards_decode_to_the_source_hu_and_manifest_hashes_match(ct_dir, tmp_path):
    nii = ct_dir / "abdomen_pelvis_ct.nii.gz"
    out = tmp_path / "out"
    # the NIfTI is 3 mm isotropic: building at 3 mm keeps the grid, so voxels must survive exactly
    rep = build_shards([f"pelvis={nii}"], out, spacing=3.0, workers=0, progress=False)
    assert rep.num_samples == 1 and rep.rejected == {}
    (vol, meta), = _samples(out)
    img = nib.load(str(nii))
    src = np.asarray(img.dataobj).astype(np.int64)  # (i, j, k) with a RAS affine whose x axis is flipped
    expected = canonicalize(Volume(np.transpose(src, (2, 1, 0)).astype(np.float32), (3.0, 3.0, 3.0),
                                   (0.0, 0.0, 0.0), np.diag([-1.0, -1.0, 1.0]) @ (img.affine[:3, :3] / 3.0)))
    np.testing.assert_array_equal(vol, np.clip(expected.array, -1024, 3071).astype(np.int16))
    assert vol.dtype == np.int16 and meta["shape"] == list(vol.shape) and meta["axis_order"] == "zyx"
    # the stored affine puts voxel (0,0,0) where the source affine puts the same voxel
    corner_ijk = [src.shape[0] - 1 if img.affine[0, 0] > 0 else 0, src.shape[1] - 1 if img.affine[1, 1] > 0 else 0, 0, 1]
    np.testing.assert_allclose(np.asarray(meta["affine_ras"]) @ [0, 0, 0, 1], img.affine @ corner_ijk, atol=1e-3)
    manifest = read_manifest(out)
    for shard in manifest["shards"]:
        data = (out / shard["url"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert manifest["datasets"] == {"pelvis": 1} and manifest["num_samples"] == 1
    assert verify_shards(out).ok


def test_real_series_build_report_and_private_outputs(dicom_build):
    private = dicom_build.with_name(dicom_build.name + ".private")
    linkage = [json.loads(line) for line in (private / "linkage.jsonl").read_text().splitlines()]
    assert len(linkage) == 1 and linkage[0]["source"].endswith("abdomen_dicom")
    report = json.loads((dicom_build / "build_report.json").read_text())
    assert report["num_samples"] == 1 and report["datasets"] == {"abdomen": 1}
    # the build folder holds only the documented shareable files
    assert sorted(p.name for p in dicom_build.iterdir()) == ["build_report.json", "manifest.json", "shard-000000.tar"]


def test_copy_of_the_series_is_built_once(ct_dir, tmp_path):
    a = tmp_path / "a" / "series"
    shutil.copytree(ct_dir / "abdomen_dicom", a)
    rep = build_shards([f"one={ct_dir / 'abdomen_dicom'}", f"two={tmp_path / 'a'}"], tmp_path / "out", workers=0, progress=False)
    assert rep.num_samples == 1 and rep.rejected == {"duplicate_content": 1}
