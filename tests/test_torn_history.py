"""Append-only JSON-lines files with a torn last line (a writer killed mid-append): read to the last complete
line, cut back there before appending; ``mim-scale report`` survives it. (The training loop's own restart on
a torn history is in tests/engine/test_resume.py.)"""

from __future__ import annotations

import json

from mim_scale.fileutil import complete_prefix_bytes, read_jsonl, truncate_torn_tail
from mim_scale.report import read_history, report

RECORDS = [{"step": 1, "total": 3.0, "rec_l1": 1.0}, {"step": 2, "total": 2.5, "rec_l1": 0.8}]


def _torn(path, tail: str = '{"step": 3, "total": 2.') -> bytes:
    whole = "".join(json.dumps(r) + "\n" for r in RECORDS)
    path.write_text(whole + tail)
    return whole.encode()


def test_read_stops_at_the_last_complete_line(tmp_path):
    path = tmp_path / "history.jsonl"
    whole = _torn(path)
    assert read_jsonl(path) == RECORDS
    assert complete_prefix_bytes(path) == len(whole)
    assert read_jsonl(tmp_path / "absent.jsonl") == [] and complete_prefix_bytes(tmp_path / "absent") == 0


def test_truncate_before_append_keeps_later_records(tmp_path):
    path = tmp_path / "history.jsonl"
    whole = _torn(path)
    assert truncate_torn_tail(path) == len('{"step": 3, "total": 2.')
    assert path.read_bytes() == whole
    with open(path, "a") as f:  # what the loop does next
        f.write(json.dumps({"step": 3, "total": 2.2}) + "\n")
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    assert truncate_torn_tail(path) == 0  # a whole file is left alone


def test_a_glued_line_in_the_middle_is_skipped_not_fatal(tmp_path, caplog):
    """What appending after a torn line without truncating produced: one complete, unparsable line."""
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"step": 2, "to' + json.dumps(RECORDS[1]) + "\n")
    assert read_jsonl(path) == [RECORDS[0]]
    assert "line 2" in caplog.text


def test_report_survives_a_torn_history(tmp_path, capsys):
    _torn(tmp_path / "history.jsonl")
    assert [h["step"] for h in read_history(tmp_path)] == [1, 2]
    out = report(tmp_path, pictures=True)  # the table and the loss curves, from the complete lines
    assert out["history"] == 2 and (tmp_path / "pictures" / "loss_curves.png").stat().st_size > 0
    assert "rec_l1" in capsys.readouterr().out
