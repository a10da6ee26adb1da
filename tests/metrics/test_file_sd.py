"""file_sd targets files: valid for Prometheus, replaced atomically, bad input rejected by name."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from mim_scale.metrics import read_file_sd, write_file_sd, write_file_sd_groups


def test_writes_prometheus_file_sd_format(tmp_path):
    path = write_file_sd(tmp_path / "sub" / "t.json", ["node-1:9400", "10.0.0.2:9401"], {"run": "r1"})
    assert json.loads(path.read_text()) == [{"targets": ["node-1:9400", "10.0.0.2:9401"], "labels": {"run": "r1"}}]
    assert read_file_sd(path)[0]["targets"] == ["node-1:9400", "10.0.0.2:9401"]
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]  # no temporary file left behind


def test_several_groups_and_ipv6(tmp_path):
    path = write_file_sd_groups(
        tmp_path / "t.json",
        [{"targets": ["[::1]:9400"], "labels": {"rank": "0"}}, {"targets": ["h:9401"], "labels": {"rank": 1}}],
    )
    assert [g["labels"]["rank"] for g in read_file_sd(path)] == ["0", "1"]


@pytest.mark.parametrize(
    "targets, labels, fragment",
    [
        (["node-1"], {}, "'node-1' is not host:port"),
        (["node-1:99999"], {}, "is not host:port"),
        (["http://h:1/metrics"], {}, "is not host:port"),
        (["h:1"], {"bad-name": "x"}, "'bad-name' is not a valid target label name"),
        (["h:1"], {"__address__": "x"}, "not a valid target label name"),
    ],
)
def test_rejects_bad_targets_and_labels_naming_the_file(tmp_path, targets, labels, fragment):
    with pytest.raises(ValueError, match="t.json") as info:
        write_file_sd(tmp_path / "t.json", targets, labels)
    assert fragment in str(info.value)
    assert not (tmp_path / "t.json").exists()


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_file_sd(tmp_path / "t.json", ["h:1"], {"run": "r"})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_file_sd(path, ["h:2"], {"run": "r"})
    assert read_file_sd(path)[0]["targets"] == ["h:1"]
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_reader_never_sees_a_partial_file(tmp_path):
    """Prometheus re-reads the file whenever it changes; every read must parse."""
    path = write_file_sd(tmp_path / "t.json", ["h:1"])
    big = [f"host-{i}.cluster.local:{9000 + i % 1000}" for i in range(3000)]  # ~100 kB per write
    stop = threading.Event()
    bad: list[str] = []

    def reader():
        reads = 0
        while not stop.is_set() or reads == 0:
            text = path.read_text()
            try:
                json.loads(text)
            except json.JSONDecodeError:
                bad.append(text[-80:])
            reads += 1

    t = threading.Thread(target=reader)
    t.start()
    for n in range(30):
        write_file_sd(path, big[: 1000 + n * 60], {"run": "r"})
    stop.set()
    t.join()
    assert bad == []


def test_read_file_sd_names_the_bad_file(tmp_path):
    p = tmp_path / "targets.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="targets.json: not valid JSON"):
        read_file_sd(p)
    p.write_text('{"targets": []}')
    with pytest.raises(ValueError, match="targets.json: a file_sd file is a JSON list"):
        read_file_sd(p)
