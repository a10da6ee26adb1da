"""mim_scale.rundir: the run folder's names, and the checks on what a worker may write into the driver's copy."""

from __future__ import annotations

import pytest

from mim_scale import rundir


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "workers/../../x", "other/x", "", "workers//x", "workers/.",
                                  "prometheus_targets/a\\b", "history.jsonl/../launcher.json", "STOP", "launcher.json"])
def test_names_outside_what_a_worker_writes_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="not a run-folder name"):
        rundir.RunFiles(tmp_path).write_text(name, "x")
    assert list(tmp_path.iterdir()) == []


def test_rank_files_round_trip_and_appends_follow_whole_lines(tmp_path):
    files = rundir.RunFiles(tmp_path)
    files.write_text(rundir.targets_file(3), "[]")
    files.write_text(rundir.worker_record(12), "{}")
    assert files.names(rundir.TARGETS_DIR) == ["prometheus_targets/rank-3.json"]
    assert [rundir.rank_of(n) for n in files.names(rundir.WORKERS_DIR)] == [12]
    assert rundir.rank_of("rank-x.json") is None
    (tmp_path / rundir.HISTORY_FILE).write_text('{"step": 1}\n{"step": 2, "to')  # a writer killed mid-line
    files.append_line(rundir.HISTORY_FILE, '{"step": 2}')
    assert (tmp_path / rundir.HISTORY_FILE).read_text() == '{"step": 1}\n{"step": 2}\n'
    with pytest.raises(ValueError, match="one line"):
        files.append_line(rundir.HISTORY_FILE, "a\nb")
    assert str(rundir.targets_glob(tmp_path)) == str(tmp_path / "prometheus_targets" / "*.json")


def test_step_checkpoints_are_the_complete_committed_ones_by_step(tmp_path):
    root = tmp_path / rundir.CHECKPOINTS_DIR
    for name in ("step_000000010", "step_00000002", "step_000000011.tmp", "step_x", ".tmp_step_00000003_7"):
        (root / name).mkdir(parents=True)
        (root / name / "state.json").write_text("{}")
    (root / "step_000000012").mkdir()  # no state.json: not complete
    found = rundir.step_checkpoints(tmp_path, lambda p: (p / "state.json").is_file())
    assert [p.name for p in found] == ["step_00000002", "step_000000010"]
    assert rundir.step_of(tmp_path / rundir.checkpoint_name(42)) == 42
    assert rundir.step_of(tmp_path / rundir.checkpoint_scratch_name(42)) is None
    assert rundir.step_checkpoints(tmp_path / "nothing", lambda p: True) == []
