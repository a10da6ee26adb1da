"""``mim-scale report``'s table: training losses first/last step, validation losses first/last validated step,
the last record of a step kept when a restart repeated it."""

from __future__ import annotations

import json

from mim_scale.report import read_history, summary_rows


def test_rows_cover_training_and_validation(tmp_path):
    records = [
        {"step": 1, "rec_l1": 1.0, "total": 3.0},
        {"step": 2, "rec_l1": 0.9, "total": 2.8, "val_rec_l1": 0.95, "val_total": 2.9},
        {"step": 3, "rec_l1": 0.5, "total": 2.0},  # lost to a restart: step 3 ran again
        {"step": 3, "rec_l1": 0.8, "total": 2.5},
        {"step": 4, "rec_l1": 0.7, "total": 2.2, "val_rec_l1": 0.76, "val_total": 2.28},
    ]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    history = read_history(tmp_path)
    assert [h["step"] for h in history] == [1, 2, 3, 4] and history[2]["rec_l1"] == 0.8
    rows = {r[0]: r[1:] for r in summary_rows(history)}
    assert rows["rec_l1"] == ("1.0000", "0.7000", "-30.0%")
    assert rows["val_rec_l1"] == ("0.9500", "0.7600", "-20.0%")  # from steps 2 and 4
    assert rows["val_total"][2] == "-21.4%"
    assert summary_rows([]) == []
