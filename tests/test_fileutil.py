"""mim_scale.fileutil: the one atomic writer and the one bounded JSON reader."""

from __future__ import annotations

import os

import pytest

from mim_scale.fileutil import JSONFileError, atomic_path, read_json_bounded, write_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, '{"step": 1}')
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b'{"st')  # a writer that dies half-way
            raise RuntimeError("killed")
    assert path.read_text() == '{"step": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    write_atomic(path, b"\x00\x01", tmp_path=tmp_path / "state.json.tmp", sync_dir=True)
    assert path.read_bytes() == b"\x00\x01" and not (tmp_path / "state.json.tmp").exists()


def test_bounded_json_is_refused_unread_when_too_large(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": [1, 2, 3]}')
    assert read_json_bounded(path, os.path.getsize(path), "not a config") == {"a": [1, 2, 3]}
    with pytest.raises(JSONFileError, match=r"^larger than 10 bytes, not a config$"):
        read_json_bounded(path, 10, "not a config")
    path.write_bytes(b'{"a": \xff}')
    with pytest.raises(JSONFileError, match=r"^not JSON"):
        read_json_bounded(path, 100, "not a config")
