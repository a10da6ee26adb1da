"""`mim-scale status` / `stop` on a real run folder, and the launch options that are checked before Ray
starts (worker ranges, elastic batch arithmetic, --env)."""

from __future__ import annotations

import json

import pytest

from mim_scale.cli import build_parser, main
from mim_scale.config import load_config
from mim_scale.errors import UserFacingError
from mim_scale.launcher.cluster import worker_env
from mim_scale.launcher.elastic import check_elastic, elastic_grad_accum, worker_range
from mim_scale.launcher.runs import STOP_FILE, resolve_run

from launcher_drills import STEPS


def test_status_and_stop_on_a_finished_run(failure_free, capsys):
    run_dir = failure_free.run_dir
    storage = str(run_dir.parent)
    assert main(["status", "reference", "--storage", storage, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["folder"] == str(run_dir)
    assert (shown["state"], shown["alive"], shown["step"], shown["samples_seen"]) == ("finished", False, STEPS, 2 * STEPS)
    assert shown["checkpoint"]["path"] == str(failure_free.checkpoint)
    assert shown["restarts"] == 0 and [w["rank"] for w in shown["workers"]] == [0, 1]

    assert main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert f"checkpoint step {STEPS}" in text and "alive: no" in text

    assert main(["stop", "reference", "--storage", storage]) == 0
    assert json.loads((run_dir / STOP_FILE).read_text())["requested"] > 0
    (run_dir / STOP_FILE).unlink()


def test_unknown_run_names_the_runs_there(failure_free):
    with pytest.raises(UserFacingError, match="reference"):
        resolve_run("no-such-run", str(failure_free.run_dir.parent))
    assert main(["status", "no-such-run", "--storage", str(failure_free.run_dir.parent)]) == 2


def test_workers_option_fixed_and_elastic():
    parser = build_parser()
    args = parser.parse_args(["pretrain", "--config", "tiny", "--workers", "2,4", "--env", "A=b=c"])
    assert args.workers == (4, 2) and args.env == [("A", "b=c")]
    assert parser.parse_args(["pretrain", "--config", "tiny", "--workers", "3"]).workers == (3, None)
    for bad in ("4,2", "x", "0,2"):
        with pytest.raises(SystemExit):
            parser.parse_args(["pretrain", "--config", "tiny", "--workers", bad])


def test_elastic_range_keeps_the_global_batch():
    cfg = load_config("tiny", ["launch.workers=4", "launch.min_workers=2", "train.grad_accum=3"])
    assert worker_range(cfg) == (2, 4)
    with pytest.raises(UserFacingError, match=r"\[3\]"):  # 4 x 1 crops do not split over 3 workers
        check_elastic(load_config("tiny", ["launch.workers=4", "launch.min_workers=3", "train.grad_accum=1"]))
    check_elastic(cfg)  # 12 splits over 2, 3 and 4 workers
    assert [elastic_grad_accum(cfg, w) for w in (2, 3, 4)] == [6, 4, 3]
    assert worker_range(load_config("tiny", ["launch.workers=2"])) == (2, 2)


def test_worker_env_forwards_named_variables(monkeypatch):
    monkeypatch.setenv("MIM_SCALE_FORWARD_ENV", "MY_TOKEN_PATH, OTHER")
    monkeypatch.setenv("MY_TOKEN_PATH", "/secrets/t")
    monkeypatch.delenv("OTHER", raising=False)
    env = worker_env(load_config("tiny"), {"EXTRA": "1"})
    assert env["MY_TOKEN_PATH"] == "/secrets/t" and env["EXTRA"] == "1" and "OTHER" not in env
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"


def test_status_and_stop_through_an_object_store_uri(failure_free):
    """The same run read through pyarrow's URI file system (what s3:// and gs:// storage goes through)."""
    from mim_scale.launcher.runs import committed_checkpoint, path_exists, request_stop, run_status

    uri = f"file://{failure_free.run_dir}"
    assert resolve_run(uri) == uri
    assert committed_checkpoint(uri) == f"{uri}/{failure_free.checkpoint.name}"
    shown = run_status(uri)
    assert (shown["step"], shown["checkpoint"]["step"], shown["restarts"]) == (STEPS, STEPS, 0)
    request_stop(uri)
    assert path_exists(f"{uri}/{STOP_FILE}") and (failure_free.run_dir / STOP_FILE).is_file()
    (failure_free.run_dir / STOP_FILE).unlink()


def test_a_failed_run_shows_the_workers_traceback_and_its_log(sample_shards, ray_cluster, tmp_path, capsys,
                                                               monkeypatch):
    """Quiet mode never hides a failure: a worker that raises (no restart left) is shown on the terminal with
    its own traceback and the log file holding the rest; the command says the run failed and exits 1."""
    from launcher_drills import drill_overrides

    monkeypatch.delenv("MIM_SCALE_LOG", raising=False)
    monkeypatch.delenv("MIM_SCALE_VERBOSE", raising=False)
    argv = ["pretrain", "--config", "tiny", "--storage", str(tmp_path / "runs"), "--name", "fails"]
    for item in drill_overrides(sample_shards, tmp_path / "runs", "fails", steps=4) + ["launch.max_failures=0"]:
        argv += ["--set", item]
    assert main(argv + ["--fault", "raise:0:2"]) == 1
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    run_dir = tmp_path / "runs" / "fails"
    assert "worker rank 0 failed: RuntimeError: injected fault on rank 0 at step 2" in captured.out
    assert 'loop.py", line' in captured.out and "in run_training" in captured.out  # the worker's own frames
    assert f"full log: {run_dir / 'logs' / 'rank-0.log'}" in captured.out
    assert "injected fault on rank 0 at step 2" in (run_dir / "logs" / "rank-0.log").read_text()
    assert "the run failed: rank 0: RuntimeError: injected fault on rank 0 at step 2" in captured.err
    assert "TrainingReport(" not in shown and "Error Snippet" not in shown  # Ray's own report: in driver.log
    assert "Error Snippet" in (run_dir / "logs" / "driver.log").read_text()
