"""Memory bombs are refused before allocation: the bomb corpus is rejected with its reasons, a Deflated DICOM is
inflated only up to a cap (in discovery too), Deflated series that fit still build exactly, and the caps are in
bytes of worker memory (just under builds, just over is refused). Peak memory is measured by
``python benchmarks/shard_memory.py``, not here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mim_scale.shards import dicom, geometry
from mim_scale.shards.bombs import BOMBS, deflate_parts, make_bomb_corpus, write_deflated_dicom
from mim_scale.shards.builder import BuildConfig, build_shards
from mim_scale.shards.limits import RESERVED_BYTES, MemoryLimits
from mim_scale.shards.nifti import load_nifti
from mim_scale.shards.worker import WorkerSettings, WorkItem, build_volume


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("bombs")
    return root, make_bomb_corpus(root / "in")


def _rejects(private: Path) -> list[dict]:
    return [json.loads(line) for line in (private / "rejects.jsonl").read_text().splitlines()]


def test_every_bomb_is_rejected_with_its_reason(bombs):
    root, paths = bombs
    rep = build_shards([f"bombs={root / 'in'}"], root / "out", workers=0, progress=False)
    assert rep.num_samples == 0
    rejects = _rejects(root / "out.private")
    for name, path in paths.items():
        reason = BOMBS[name][0]
        mine = [r for r in rejects if r["source"] == str(path) or r["source"].startswith(str(path) + "/")]
        assert [r["reason"] for r in mine] == [reason], (name, mine)
        if reason == "too_large":  # the detail says what the cap is and how to raise it
            assert "--worker-memory" in mine[0]["detail"] or "inflates beyond" in mine[0]["detail"], mine


def test_deflate_is_inflated_only_up_to_the_cap():
    stream = deflate_parts([b"abc", 1 << 30])  # 1 GiB of zeros in ~1 MB
    data, over, ended = dicom.inflate_capped(io.BytesIO(stream), 1 << 20)
    assert len(data) == 1 << 20 and over and not ended
    data, over, ended = dicom.inflate_capped(io.BytesIO(deflate_parts([b"abc", 1000])), 1 << 20)
    assert data == b"abc" + bytes(1000) and not over and ended


def test_header_discovery_never_inflates_a_whole_file(bombs, monkeypatch):
    _, paths = bombs
    calls: list[tuple[int, int]] = []
    real = dicom.inflate_capped

    def spy(f, cap):
        out = real(f, cap)
        calls.append((cap, len(out[0])))
        return out

    monkeypatch.setattr(dicom, "inflate_capped", spy)
    files = [str(p) for name in ("deflate_declared", "deflate_trailer", "deflate_header", "late_file_dims")
             for p in sorted(paths[name].iterdir())]
    series, rejects = dicom.discover(files)
    # one 64 KiB step per file whose header is short; the 1 GiB element grows the step up to the header cap only
    assert all(n <= cap <= MemoryLimits().header_bytes for cap, n in calls)
    assert sorted(cap for cap, _ in calls)[: len(files) - 1] == [1 << 16] * (len(files) - 1)
    assert max(cap for cap, _ in calls) == MemoryLimits().header_bytes
    assert [r.reason for r in rejects] == ["too_large"]  # the 1 GiB private element before the pixels
    assert sum(len(s.files) for s in series) == len(files) - 1


def test_a_deflated_copy_of_the_real_series_builds_exactly_like_the_original(ct_dir, tmp_path):
    files = sorted((ct_dir / "abdomen_dicom").iterdir())[:6]
    deflated = []
    for k, src in enumerate(files):
        ds = pydicom.dcmread(src)
        ds.decompress()  # JPEG 2000 -> native, then Deflated on disk
        native = tmp_path / "native" / f"{k}.dcm"
        native.parent.mkdir(exist_ok=True)
        ds.save_as(native, enforce_file_format=True)
        deflated.append(write_deflated_dicom(native, tmp_path / "deflated" / f"{k}.dcm",
                                             series_uid=str(ds.SeriesInstanceUID)))
    a = dicom.load_series([str(f) for f in files])
    b = dicom.load_series([str(f) for f in deflated])
    assert np.array_equal(a.array, b.array) and a.spacing == b.spacing and a.origin == b.origin
    assert pydicom.dcmread(deflated[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == \
        pydicom.uid.DeflatedExplicitVRLittleEndian


def test_caps_are_bytes_of_worker_memory_just_under_builds_just_over_is_refused(ct_dir):
    nii = ct_dir / "abdomen_pelvis_ct.nii.gz"
    item = WorkItem(0, "k", "d", "nifti", (str(nii),), str(nii))
    src = load_nifti(str(nii)).array.shape
    out = geometry.resampled_shape(src, (3.0, 3.0, 3.0), 1.5)
    limits = MemoryLimits()
    need = max(limits.source_bytes(src, 4), limits.resample_bytes(src, out))
    arr, _ = build_volume(item, WorkerSettings(worker_memory_bytes=RESERVED_BYTES + need))
    assert arr.shape == out
    with pytest.raises(Exception) as exc:
        build_volume(item, WorkerSettings(worker_memory_bytes=RESERVED_BYTES + need - 1))
    assert getattr(exc.value, "reason", None) == "too_large"


def test_worker_memory_is_validated():
    from mim_scale.errors import UserFacingError

    with pytest.raises(UserFacingError, match="worker-memory"):
        BuildConfig(worker_memory_bytes=1 << 20)


def test_a_jpeg2000_codestream_larger_than_its_header_is_not_decoded(ct_dir, tmp_path, monkeypatch):
    """A real J2K slice whose codestream SIZ says 60000x60000 (the decoder would allocate that): refused before
    any decoder runs, naming both sizes."""
    files = sorted((ct_dir / "abdomen_dicom").iterdir())[:5]
    dst = tmp_path / "series"
    dst.mkdir()
    for k, src in enumerate(files):
        data = bytearray(src.read_bytes())
        if k == 3:
            siz = data.index(b"\xff\x4f\xff\x51")
            data[siz + 8:siz + 16] = (60000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
        (dst / src.name).write_bytes(bytes(data))

    bomb = str(sorted(dst.iterdir())[3])
    real_pixel_array = pydicom.Dataset.pixel_array

    def guarded(self):
        assert getattr(self, "filename", None) != bomb, "the decoder ran on the bomb"
        return real_pixel_array.fget(self)

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(guarded))
    with pytest.raises(Exception) as exc:
        dicom.load_series([str(p) for p in sorted(dst.iterdir())])
    assert getattr(exc.value, "reason", None) == "pixel_decode_failed"
    assert "codestream declares 60000x60000x1, the header 512x512x1" in exc.value.detail
    assert exc.value.source == bomb
