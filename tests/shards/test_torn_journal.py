"""The builder journal after a kill mid-write: read to its last complete line and cut back there before appending,
so no later record is lost, nothing is built twice and a finished set's manifest is never deleted; renames are
followed by an fsync of their directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mim_scale import fileutil
from mim_scale.shards import builder
from mim_scale.shards.builder import build_shards
from mim_scale.shards.synth import phantom, write_nifti

SHARD_BYTES = 40_000  # a few samples per shard: several shards, several journal lines


@pytest.fixture()
def inputs(tmp_path) -> Path:
    for i in range(6):
        write_nifti(phantom((12, 48, 48), seed=60 + i), tmp_path / "in" / f"v{i}.nii.gz")
    return tmp_path / "in"


def _build(inputs: Path, out: Path):
    return build_shards([str(inputs)], out, workers=0, progress=False, target_shard_bytes=SHARD_BYTES)


def _journal(out: Path) -> Path:
    return out.with_name(out.name + ".private") / "journal.jsonl"


def test_a_torn_journal_is_cut_back_then_nothing_is_lost_or_built_twice(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = _build(inputs, out)
    manifest = (out / "manifest.json").read_bytes()
    journal = _journal(out)
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 4 and first.num_shards >= 2
    # a kill in the middle of writing the third record: two whole records, half a line, no manifest yet
    journal.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    (out / "manifest.json").unlink()
    resumed = _build(inputs, out)
    assert 0 < resumed.built_now < first.num_samples  # only what came after the last whole record
    assert (out / "manifest.json").read_bytes() == manifest
    for line in journal.read_bytes().splitlines():  # the torn half-line is gone, not glued to the next record
        assert isinstance(json.loads(line), dict)
    # a second re-run finds the whole set in the journal: nothing rebuilt, the manifest never removed
    removed: list[str] = []
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (removed.append(self.name), real_unlink(self, *a, **k)))
    again = _build(inputs, out)
    assert again.built_now == 0 and again.resumed_items == first.num_samples
    assert "manifest.json" not in removed
    assert (out / "manifest.json").read_bytes() == manifest


def test_a_torn_plan_line_starts_the_journal_anew(inputs, tmp_path):
    out = tmp_path / "out"
    _build(inputs, out)
    journal = _journal(out)
    journal.write_bytes(journal.read_bytes()[:10])  # killed while writing the very first line
    (out / "manifest.json").unlink()
    rep = _build(inputs, out)
    assert rep.built_now == rep.num_samples == 6
    assert all(json.loads(line) for line in journal.read_bytes().splitlines())


def test_directories_are_fsynced_after_renames(inputs, tmp_path, monkeypatch):
    synced: list[Path] = []
    real = fileutil.fsync_dir
    spy = lambda p: (synced.append(Path(p)), real(p))  # noqa: E731
    monkeypatch.setattr(builder, "fsync_dir", spy)  # after a shard's rename
    monkeypatch.setattr(fileutil, "fsync_dir", spy)  # after the atomic writes' renames (journal, salt, manifest, ...)
    out = tmp_path / "out"
    rep = _build(inputs, out)
    # one fsync of OUT per closed shard (before the journal records it), and after the manifest's rename
    assert synced.count(out) >= rep.num_shards + 1
    assert out.with_name("out.private") in synced  # journal, salt, rejects and linkage renames
