"""The bad-input corpus: every broken or unusual input is rejected with its reason, every good one built,
and nothing half-written is left looking complete (including a full disk mid-write)."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from mim_scale.errors import UserFacingError
from mim_scale.shards import fileio, writer
from mim_scale.shards.builder import build_shards
from mim_scale.shards.format import read_manifest
from mim_scale.shards.synth import phantom, write_dicom_series, write_nifti
from mim_scale.shards.verify import verify_shards

SMALL = (8, 32, 32)


class FileProxy:
    """A file object that delegates to a real one; the fault-injection tests override read or write."""

    def __init__(self, f):
        self.f = f

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def _series(folder: Path, seed: int = 0, shape=SMALL, **kw) -> list[Path]:
    return write_dicom_series(phantom(shape, seed=seed), folder, **kw)


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


def _nifti_raw(path: Path, data: np.ndarray, affine=None) -> Path:
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    nib.save(img, str(path))
    return path


def make_corpus(root: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """-> (expected reason by source path, good inputs by name). Each bad kind has its own path."""
    bad: dict[str, str] = {}
    good: dict[str, Path] = {}
    g = root / "good"
    # good: plain series, signed pixels, deep nesting with odd names, NIfTI, two series in one folder,
    # a series with a localizer mixed in, a file without preamble (no file meta)
    good["series"] = _series(g / "a" / "series", seed=1)[0].parent
    good["signed"] = _series(g / "signed", seed=2, signed=True)[0].parent
    good["nested"] = _series(g / "x" / "y" / "z" / "w", seed=3, file_name=lambda i: f"{(i * 7) % 8}")[0].parent
    good["nifti"] = write_nifti(phantom(SMALL, seed=4), g / "vol.nii.gz")
    good["nifti_plain"] = write_nifti(phantom(SMALL, seed=5), g / "vol2.nii", dtype=np.float32)
    mixed = g / "mixed"
    _series(mixed, seed=6, file_name=lambda i: f"s1_{i}.dcm")
    _series(mixed, seed=7, file_name=lambda i: f"s2_{i}.dcm")
    good["mixed_two_series"] = mixed
    loc = _series(g / "with_localizer", seed=8)
    shutil.copy(loc[0], loc[0].parent / "scout.dcm")
    _edit(loc[0].parent / "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImagePositionPatient=[0, 0, 500])
    bad[str(loc[0].parent / "scout.dcm")] = "localizer"
    good["with_localizer"] = loc[0].parent
    # a NIfTI followed by 64 MiB of zeros inside its gzip stream (a gzip bomb tail): only the declared
    # bytes are inflated, the volume is built
    bomb = nib.Nifti1Image(phantom(SMALL, seed=31).transpose(2, 1, 0).copy(), np.diag([-1.0, -1.0, 2.0, 1.0]))
    (g / "bomb_tail.nii.gz").write_bytes(gzip.compress(bomb.to_bytes() + bytes(64 << 20), compresslevel=1))
    good["bomb_tail"] = g / "bomb_tail.nii.gz"
    nometa = _series(g / "no_preamble", seed=9)
    for p in nometa:
        ds = pydicom.dcmread(p)
        ds.preamble = None
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.save_as(p, enforce_file_format=False, implicit_vr=True, little_endian=True)
    good["no_preamble"] = nometa[0].parent

    b = root / "bad"
    # file level
    (b / "junk").mkdir(parents=True)
    (b / "junk" / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    bad[str(b / "junk" / "random.dcm")] = "not_dicom"
    (b / "junk" / "notes.dcm").write_text("patient list\n" * 50)
    bad[str(b / "junk" / "notes.dcm")] = "not_dicom"
    (b / "junk" / "empty.dcm").write_bytes(b"")
    bad[str(b / "junk" / "empty.dcm")] = "empty_file"
    (b / "junk" / "preamble_only.dcm").write_bytes(b"\0" * 128 + b"DICM")
    bad[str(b / "junk" / "preamble_only.dcm")] = "truncated"
    trunc = _series(b / "truncated", seed=10)
    data = trunc[3].read_bytes()
    trunc[3].write_bytes(data[: len(data) // 2])
    bad[str(b / "truncated")] = "pixel_decode_failed"
    nopix = _series(b / "no_pixeldata", seed=11)
    for p in nopix:
        _edit(p, PixelData=None)
    bad[str(b / "no_pixeldata")] = "missing_pixel_data"
    bits = _series(b / "bits_allocated", seed=12)
    for p in bits:
        _edit(p, BitsAllocated=12)
    bad[str(b / "bits_allocated")] = "pixel_decode_failed"
    rgb = _series(b / "rgb", seed=13)
    for p in rgb:
        _edit(p, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    bad[str(b / "rgb")] = "not_grayscale"
    nogeo = _series(b / "no_ipp", seed=14)
    _edit(nogeo[2], ImagePositionPatient=None)
    bad[str(b / "no_ipp")] = "missing_geometry"
    unread = _series(b / "unreadable", seed=15)
    bad[str(unread[3])] = "unreadable"  # injected PermissionError on this one file
    bad[str(b / "unreadable")] = "missing_slices"  # the rest of its series then has a gap
    # series level
    dup = _series(b / "duplicate_slice", seed=16)
    shutil.copy(dup[4], dup[4].parent / "copy.dcm")
    _edit(dup[4].parent / "copy.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
    bad[str(b / "duplicate_slice")] = "duplicate_positions"
    miss = _series(b / "missing_slice", seed=17)
    miss[4].unlink()
    bad[str(b / "missing_slice")] = "missing_slices"
    irr = _series(b / "irregular", seed=18)
    _edit(irr[5], ImagePositionPatient=[-64, -64, -100 + 2 * 5 + 0.7])
    bad[str(b / "irregular")] = "irregular_spacing"
    tilt = _series(b / "tilt", seed=19)
    for k, p in enumerate(tilt):
        _edit(p, ImagePositionPatient=[-64, -64 + 0.5 * k, -100 + 2 * k])
    bad[str(b / "tilt")] = "gantry_tilt"
    mo = _series(b / "mixed_orientation", seed=20)
    _edit(mo[3], ImageOrientationPatient=[1, 0, 0, 0, 0.9, 0.43589])
    bad[str(b / "mixed_orientation")] = "mixed_orientations"
    md = _series(b / "mixed_dims", seed=21)
    _edit(md[2], PixelSpacing=[0.5, 0.5])
    bad[str(b / "mixed_dims")] = "mixed_dimensions"
    _series(b / "mr", seed=22, modality="MR")
    bad[str(b / "mr")] = "non_ct_modality"
    oblique = _series(b / "oblique45", seed=23, iop=(0.7071068, 0.7071068, 0, -0.7071068, 0.7071068, 0))
    bad[str(oblique[0].parent)] = "ambiguous_orientation"
    zero_sp = _series(b / "zero_spacing", seed=24)
    for p in zero_sp:
        _edit(p, PixelSpacing=[0, 0])
    bad[str(b / "zero_spacing")] = "absurd_spacing"
    _series(b / "few", seed=25, shape=(2, 32, 32))
    bad[str(b / "few")] = "too_few_slices"
    onlyloc = _series(b / "only_localizer", seed=26, shape=(4, 32, 32))
    for p in onlyloc:
        _edit(p, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
        bad[str(p)] = "localizer"
    huge = _series(b / "huge", seed=27, shape=(4, 32, 32))
    for p in huge:
        _edit(p, Rows=60000, Columns=60000)
    bad[str(b / "huge")] = "too_large"
    _series(b / "small_fov", seed=28, shape=(6, 8, 8))
    bad[str(b / "small_fov")] = "too_small"
    # pydicom-data edge cases
    pd = b / "pydicom_data"
    pd.mkdir()
    for name, reason, key in (
        ("CT_small.dcm", "too_few_slices", "dir"), ("693_J2KR.dcm", "too_few_slices", "dir"),
        ("J2K_pixelrep_mismatch.dcm", "too_few_slices", "dir"), ("bad_sequence.dcm", "too_few_slices", "dir"),
        ("eCT_Supplemental.dcm", "derived_image", "dir"), ("MR_small.dcm", "non_ct_modality", "dir"),
        ("emri_small.dcm", "non_ct_modality", "dir"), ("liver.dcm", "non_ct_modality", "dir"),
        ("rtplan.dcm", "not_image", "file"), ("DICOMDIR", "not_image", "file"), ("test-SR.dcm", "not_image", "file"),
        ("SC_rgb.dcm", "non_ct_modality", "dir"), ("rtstruct.dcm", "not_image", "file"),
    ):
        sub = pd / name.replace(".", "_")
        sub.mkdir()
        shutil.copy(get_testdata_file(name), sub / name)
        bad[str(sub / name)] = reason  # one-file series: the file is the source
    # NIfTI
    n = b / "nifti"
    n.mkdir()
    arr = phantom(SMALL, seed=30).astype(np.float32).transpose(2, 1, 0).copy()
    nan = arr.copy()
    nan[3, 3, 3] = np.nan
    bad[str(_nifti_raw(n / "nan.nii.gz", nan))] = "non_finite_values"
    inf = arr.copy()
    inf[1, 2, 3] = np.inf
    bad[str(_nifti_raw(n / "inf.nii", inf))] = "non_finite_values"
    bad[str(_nifti_raw(n / "flat2d.nii.gz", arr[:, :, 0]))] = "not_3d"
    bad[str(_nifti_raw(n / "four_d.nii.gz", np.stack([arr, arr], axis=-1)))] = "not_3d"
    bad[str(_nifti_raw(n / "absurd.nii.gz", arr, np.diag([1000.0, 1000.0, 1000.0, 1.0])))] = "absurd_spacing"
    shear = np.eye(4)
    shear[0, 1] = 0.5
    bad[str(_nifti_raw(n / "shear.nii.gz", arr, shear))] = "sheared_affine"
    bad[str(_nifti_raw(n / "labels.nii.gz", (arr > 0).astype(np.uint8)))] = "not_ct_intensity"
    full = (n / "nan.nii.gz").read_bytes()
    good_bytes = gzip.compress(nib.Nifti1Image(arr, np.eye(4)).to_bytes())
    (n / "cut.nii.gz").write_bytes(good_bytes[: len(good_bytes) // 2])
    bad[str(n / "cut.nii.gz")] = "truncated"
    (n / "junk.nii.gz").write_bytes(b"\x1f\x8b" + full[2:40])
    bad[str(n / "junk.nii.gz")] = "truncated"
    (n / "empty.nii").write_bytes(b"")
    bad[str(n / "empty.nii")] = "empty_file"
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.int16)
    (n / "huge.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 64)
    bad[str(n / "huge.nii")] = "too_large"
    (n / "text.nii").write_bytes(b"not a nifti at all\n" * 40)
    bad[str(n / "text.nii")] = "read_failed"
    return bad, good


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    bad, good = make_corpus(root / "in")
    return root, bad, good


@pytest.fixture(scope="module")
def corpus_build(corpus):
    root, bad, good = corpus
    blocked = next(p for p, r in bad.items() if r == "unreadable")
    real_open = fileio.open_input

    def open_input(path):
        if str(path) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path)

    mp = pytest.MonkeyPatch()
    mp.setattr(fileio, "open_input", open_input)
    try:
        rep = build_shards([f"good={root / 'in' / 'good'}", f"bad={root / 'in' / 'bad'}"], root / "out",
                           workers=0, progress=False, target_shard_bytes=30_000)
    finally:
        mp.undo()
    return root, rep


def test_corpus_has_at_least_30_kinds(corpus):
    _, bad, good = corpus
    assert len(bad) + len(good) >= 30
    assert len(set(bad.values())) >= 25


def test_every_bad_input_is_rejected_with_its_reason(corpus, corpus_build):
    _, bad, good = corpus
    root, rep = corpus_build
    rejects = [json.loads(line) for line in (root / "out.private" / "rejects.jsonl").read_text().splitlines()]
    by_source: dict[str, set[str]] = {}
    for r in rejects:
        assert r["reason"] and r["source"]
        by_source.setdefault(r["source"], set()).add(r["reason"])
    wrong = {src: (reason, by_source.get(src)) for src, reason in bad.items() if reason not in by_source.get(src, set())}
    assert not wrong, wrong
    assert sum(rep.rejected.values()) == len(rejects)


def test_every_good_input_is_in_the_shards(corpus, corpus_build):
    _, _, good = corpus
    root, rep = corpus_build
    linkage = [json.loads(line) for line in (root / "out.private" / "linkage.jsonl").read_text().splitlines()]
    sources = [r["source"] for r in linkage]
    for name, path in good.items():
        n = 2 if name == "mixed_two_series" else 1
        assert sum(1 for s in sources if s == str(path)) == n, (name, sources)
    assert rep.datasets == {"good": len(good) + 1}
    assert verify_shards(root / "out").ok
    assert read_manifest(root / "out")["num_samples"] == len(good) + 1
    assert not list((root / "out").glob("*.tmp"))
    assert rep.num_shards > 1  # small target: several shards, each complete


def test_full_disk_mid_write_leaves_nothing_that_looks_complete_then_resumes(tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    for i in range(4):
        write_nifti(phantom((16, 64, 64), seed=40 + i), inputs / f"v{i}.nii.gz")
    out = tmp_path / "out"
    real_open = writer.open_output
    budget = {"bytes": 100_000}

    class Full(FileProxy):
        def write(self, data):
            budget["bytes"] -= len(data)
            if budget["bytes"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

    monkeypatch.setattr(writer, "open_output", lambda p: Full(real_open(p)))
    with pytest.raises(UserFacingError, match="No space left"):
        build_shards([str(inputs)], out, workers=0, progress=False, target_shard_bytes=50_000)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))
    done = sorted(out.glob("shard-*.tar"))
    for p in done:  # every shard that has its final name is complete
        n = sum(1 for _ in __import__("tarfile").open(p))
        assert n % 2 == 0 and n > 0
    monkeypatch.setattr(writer, "open_output", real_open)
    rep = build_shards([str(inputs)], out, workers=0, progress=False, target_shard_bytes=50_000)
    assert rep.num_samples == 4 and rep.resumed_items >= 1
    assert verify_shards(out).ok


def test_unusable_outputs_are_user_facing_errors(tmp_path):
    with pytest.raises(UserFacingError, match="does not exist"):
        build_shards([str(tmp_path / "nope")], tmp_path / "out", workers=0, progress=False)
    (tmp_path / "in").mkdir()
    with pytest.raises(UserFacingError, match="private dir"):
        build_shards([str(tmp_path / "in")], tmp_path / "out", private_dir=tmp_path / "out" / "p", workers=0, progress=False)
    with pytest.raises(UserFacingError, match="expected a 64-hex"):
        (tmp_path / "ex.txt").write_text("not-a-hash\n")
        build_shards([str(tmp_path / "in")], tmp_path / "out", exclude=tmp_path / "ex.txt", workers=0, progress=False)



def test_a_gzip_bomb_tail_is_never_inflated(tmp_path, monkeypatch):
    from mim_scale.shards.nifti import load_nifti

    vol = phantom(SMALL, seed=31)
    img = nib.Nifti1Image(vol.transpose(2, 1, 0).copy(), np.diag([-1.0, -1.0, 2.0, 1.0]))
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(img.to_bytes() + bytes(256 << 20), compresslevel=1))
    consumed = {"bytes": 0}
    real_open = fileio.open_input

    class Counting(FileProxy):
        def read(self, n=-1):
            data = self.f.read(n)
            consumed["bytes"] += len(data)
            return data

    monkeypatch.setattr(fileio, "open_input", lambda p: Counting(real_open(p)))
    out = load_nifti(str(path))
    assert out.array.shape == SMALL
    assert consumed["bytes"] < path.stat().st_size // 4
