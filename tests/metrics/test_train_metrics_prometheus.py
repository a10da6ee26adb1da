"""TrainMetrics endpoints scraped by a real Prometheus server (Debian's package, on loopback)."""

from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path

import pytest

from mim_scale.metrics import TrainMetrics, write_file_sd
from prometheus_server import PrometheusServer, values

LOSSES = {"rec_l1": 0.9, "rec_l2": 0.7, "rec_l3": 0.5, "align_12": 0.2, "align_23": 0.1, "total": 2.4}


def _step(m: TrainMetrics, step: int, scale: float = 1.0) -> None:
    m.record_step(
        step=step,
        step_seconds=0.2,
        data_wait_seconds=0.05,
        crops=4,
        volumes=2,
        tokens=4 * 512,
        losses={k: v * scale for k, v in LOSSES.items()},
        lr=1e-4,
        grad_norm=1.5,
        mfu=0.4,
        collapse_std={"level1": 0.3, "level2": 0.2},
    )


def test_two_ranks_scraped_through_file_sd(tmp_path):
    ranks = [TrainMetrics("run-a", rank) for rank in (0, 1)]
    try:
        targets_file = write_file_sd(tmp_path / "prometheus_targets.json", [m.target for m in ranks], {"run": "run-a"})
        with PrometheusServer.start(tmp_path / "prom", file_sd=targets_file) as prom:
            for m in ranks:
                _step(m, 1)
            first = values(prom.wait_for('mim_steps_total{run="run-a"} >= 1', count=2), "rank")
            assert set(first) == {"0", "1"}

            for step in (2, 3):
                for m in ranks:
                    _step(m, step, scale=1.0 / step)
            later = values(prom.wait_for('mim_steps_total{run="run-a"} >= 3', count=2), "rank")
            assert all(later[r] > first[r] for r in ("0", "1")), (first, later)
            assert values(prom.query('mim_step{run="run-a"}'), "rank") == {"0": 3.0, "1": 3.0}
            # the counter increased on both ranks over the scraped history
            inc = values(prom.query('increase(mim_steps_total{run="run-a"}[1m])'), "rank")
            assert set(inc) == {"0", "1"} and all(v > 0 for v in inc.values()), inc

            loss = prom.query('mim_loss{run="run-a",rank="0"}')
            assert {r["metric"]["level"]: float(r["value"][1]) for r in loss} == pytest.approx(
                {"1": 0.9 / 3, "2": 0.7 / 3, "3": 0.5 / 3}
            )
            align = values(prom.query('mim_alignment_loss{run="run-a",rank="1"}'), "level")
            assert align == pytest.approx({"1-2": 0.2 / 3, "2-3": 0.1 / 3})
            # data-wait fraction as the alert computes it: 0.05 s of every 0.2 s step
            frac = prom.query(
                'sum by (run) (mim_data_wait_seconds_total) / sum by (run) (mim_step_duration_seconds_sum)'
            )
            assert float(frac[0]["value"][1]) == pytest.approx(0.25)
            assert values(prom.query("mim_mfu"), "rank") == {"0": 0.4, "1": 0.4}
            assert values(prom.query('mim_crops_total{run="run-a"}'), "rank") == {"0": 12.0, "1": 12.0}
            mem = values(prom.query("mim_device_memory_peak_bytes"), "rank")
            assert set(mem) == {"0", "1"} and all(v > 10 * 2**20 for v in mem.values())
            # the job sees both targets healthy, discovered from the file
            health = {t["scrapeUrl"]: t["health"] for t in prom.targets()}
            assert sorted(health) == sorted(f"http://{m.target}/metrics" for m in ranks)
            assert set(health.values()) == {"up"}
            _check_dashboard_queries(prom)
    finally:
        for m in ranks:
            m.close()


def _check_dashboard_queries(prom: PrometheusServer) -> None:
    """Every dashboard query parses in this Prometheus, and the panels the issue names have data."""
    dash = json.loads((Path(__file__).resolve().parents[2] / "launcher/monitoring/grafana-dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace('"$run"', '"run-a"')
            result = prom.query(expr)  # raises on a parse error
            if any(w in panel["title"] for w in ("Throughput", "MFU", "Reconstruction", "Data wait", "memory")):
                assert result, f"dashboard panel {panel['title']!r}: {expr} returned nothing"


def test_restart_as_new_process_is_seen_by_the_restart_query(tmp_path):
    """A restarted worker is a new endpoint; the count from its checkpoint makes the restart visible."""
    old = TrainMetrics("run-r", 0)
    targets = tmp_path / "targets.json"
    write_file_sd(targets, [old.target], {"run": "run-r"})
    with PrometheusServer.start(tmp_path / "prom", file_sd=targets) as prom:
        _step(old, 1)
        prom.wait_for('mim_steps_total{run="run-r"} >= 1')
        assert values(prom.query("max by (run) (mim_restarts_total)"), "run") == {"run-r": 0.0}
        old.close()  # the worker dies ...
        new = TrainMetrics("run-r", 0)  # ... and comes back on another port, restart count from its checkpoint
        try:
            new.set_restarts(1)
            write_file_sd(targets, [new.target], {"run": "run-r"})
            _step(new, 2)
            prom.wait_for('max by (run) (mim_restarts_total{run="run-r"}) >= 1')
            # the alert's expression, over a window that holds both processes
            changed = prom.wait_for("changes(max by (run) (mim_restarts_total)[1m:1s]) > 0")
            assert values(changed, "run")["run-r"] >= 1
        finally:
            new.close()


def test_nonfinite_loss_is_exported_and_counted():
    with TrainMetrics("run-n", 0) as m:
        _step(m, 1)
        m.record_step(1, 0.1, 0.0, 1, 1, 8, {"rec_l1": float("nan"), "total": float("inf")}, lr=1e-4)
        assert m.sample("mim_nonfinite_losses_total") == 1.0
        assert math.isnan(m.sample("mim_loss", level="1"))
        assert m.sample("mim_objective_loss") == math.inf
        # rec_l2 was not in this step's dict: the last value stays
        assert m.sample("mim_loss", level="2") == pytest.approx(0.7)
        body = urllib.request.urlopen(f"http://{m.target}/metrics", timeout=5).read().decode()
        assert 'mim_loss{level="1",rank="0",run="run-n"} NaN' in body
        assert 'mim_objective_loss{rank="0",run="run-n"} +Inf' in body
