"""sample-data: local copies, the archive layout, and clear errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from mim_scale import sample_data
from mim_scale.cli import main
from mim_scale.errors import UserFacingError


def test_copy_from_local(ct_dir, tmp_path):
    dest = tmp_path / "ct"
    assert main(["sample-data", str(dest), "--from", str(ct_dir)]) == 0
    assert sample_data.is_complete(dest)
    assert (dest / "abdomen_pelvis_ct.nii.gz").read_bytes() == (ct_dir / "abdomen_pelvis_ct.nii.gz").read_bytes()
    # a second run is a no-op on a complete folder
    assert sample_data.ensure_sample_data(dest=dest, source=ct_dir) == dest


def test_incomplete_copy_is_a_clear_error(ct_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "labels_total.json").write_text("{}")
    assert main(["sample-data", str(tmp_path / "x"), "--from", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "abdomen_dicom" in err


def test_env_var_is_used_in_place(ct_dir, monkeypatch):
    monkeypatch.setenv(sample_data.ENV_VAR, str(ct_dir))
    assert sample_data.ensure_sample_data() == ct_dir


def _repacked_archive(ct_dir: Path, path: Path, drop: str | None = None) -> None:
    """The real sample files laid out as in the TotalSegmentator source archive."""
    labels = json.loads((ct_dir / "labels_total.json").read_text())
    class_map_py = "class_map = {\n    'total': %r,\n}\n" % {int(k): v for k, v in labels.items()}
    with tarfile.open(path, "w:gz") as tar:
        for member, name in sample_data.ARCHIVE_FILES.items():
            if name != drop:
                tar.add(ct_dir / name, arcname=member)
        for f in sorted((ct_dir / "abdomen_dicom").iterdir()):
            tar.add(f, arcname=sample_data.ARCHIVE_DICOM_DIR + f.name)
        data = class_map_py.encode()
        info = tarfile.TarInfo(sample_data.ARCHIVE_CLASS_MAP)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_extract_archive_layout(ct_dir, tmp_path):
    archive = tmp_path / "a.tar.gz"
    _repacked_archive(ct_dir, archive)
    dest = tmp_path / "out"
    sample_data.extract_archive(archive, dest)
    assert sample_data.is_complete(dest)
    assert json.loads((dest / "labels_total.json").read_text()) == json.loads((ct_dir / "labels_total.json").read_text())
    for f in (ct_dir / "abdomen_dicom").iterdir():
        assert (dest / "abdomen_dicom" / f.name).read_bytes() == f.read_bytes()


def test_extract_archive_missing_member(ct_dir, tmp_path):
    archive = tmp_path / "a.tar.gz"
    _repacked_archive(ct_dir, archive, drop="abdomen_pelvis_ct.nii.gz")
    with pytest.raises(UserFacingError, match="lacks some sample files"):
        sample_data.extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
