"""`mim-scale monitor RUN_DIR`: a local Prometheus against a local run's targets (RUN/prometheus_targets/rank-N.json,
the files the workers send to the driver's run folder); SIGTERM takes its Prometheus down as Ctrl-C does."""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.parse
import urllib.request

import pytest

from mim_scale import rundir
from mim_scale.errors import UserFacingError
from mim_scale.metrics import TrainMetrics, write_file_sd
from mim_scale.monitor import find_prometheus, register, write_local_config
from prometheus_server import find_binary, free_port


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


def test_monitor_subcommand_scrapes_the_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    worker = TrainMetrics("local-run", 0)
    write_file_sd(run_dir / rundir.targets_file(0), [worker.target], {"run": "local-run"})  # what a worker sends
    worker.record_step(7, 0.1, 0.0, 1, 1, 1, {"rec_l1": 0.5, "total": 0.5}, lr=1e-3)

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    port = free_port()
    args = parser.parse_args(
        ["monitor", str(run_dir), "--port", str(port), "--prometheus", str(find_binary()),
         "--scrape-interval", "1s", "--duration", "90"]
    )  # fmt: skip
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(args.func(args)))
    t.start()
    try:
        result: list[dict] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not result:
            time.sleep(0.5)
            try:
                result = _query(port, 'mim_step{run="local-run"}')
            except OSError:
                continue
        assert [float(r["value"][1]) for r in result] == [7.0]
        rules = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5))
        names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert "MimStepStalled" in names  # the shipped alert rules are loaded
    finally:
        try:  # stop early instead of waiting out --duration; the command must still exit cleanly
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/-/quit", method="POST"), timeout=5)
        except OSError:
            pass
        t.join(timeout=120)
        worker.close()
    assert rc == [0]
    assert f"prometheus: http://127.0.0.1:{port}" in capsys.readouterr().out
    assert (run_dir / "monitor" / "prometheus.yml").is_file()


def test_local_config_points_at_the_targets_file(tmp_path):
    path = write_local_config(tmp_path, targets_file=tmp_path / "elsewhere.json")
    text = path.read_text()
    assert str(tmp_path / "elsewhere.json") in text
    assert "honor_labels: true" in text
    assert (path.parent / "alerts.yml").is_file()


def test_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(UserFacingError, match="not a run directory"):
        write_local_config(tmp_path / "missing")
    monkeypatch.setenv("MIM_SCALE_PROMETHEUS", str(tmp_path / "nope"))
    with pytest.raises(UserFacingError, match="install_prometheus.sh"):
        find_prometheus()


def test_sigterm_stops_monitor_and_its_prometheus(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mim_scale.cli", "monitor", str(run_dir), "--port", str(port),
                             "--prometheus", str(find_binary())], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once Prometheus is ready
        assert line.startswith("prometheus: "), line
        child = int(line.split("(pid ")[1].split(",")[0])
        os.kill(child, 0)  # Prometheus is up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail(f"monitor exited on SIGTERM but left its Prometheus (pid {child}) running")
    finally:
        if proc.poll() is None:
            proc.kill()
