"""The shipped Prometheus config, alert rules and dashboard, checked by Prometheus's own promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from prometheus_server import find_binary

MONITORING = Path(__file__).resolve().parents[2] / "launcher" / "monitoring"


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(find_binary("promtool")), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_alert_rules_unit_tests_pass():
    proc = _promtool("test", "rules", "alerts_test.yml", cwd=MONITORING)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"MimStepStalled", "MimLossNotFinite", "MimDataStarved", "MimRunRestarted"} <= names
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == names and quiet == names


def test_alert_rules_unit_tests_can_fail(tmp_path):
    """A broken threshold must make promtool fail, or the passing run above proves nothing."""
    shutil.copy(MONITORING / "alerts_test.yml", tmp_path)
    rules = (MONITORING / "alerts.yml").read_text().replace("> 0.3", "> 0.6")
    (tmp_path / "alerts.yml").write_text(rules)
    proc = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "MimDataStarved" in proc.stdout + proc.stderr


def test_prometheus_config_is_valid(tmp_path):
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(MONITORING / name, tmp_path)
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "run.json").write_text('[{"targets": ["127.0.0.1:9400"], "labels": {"run": "r"}}]')
    proc = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 1 rule files found" in proc.stdout + proc.stderr


def test_dashboard_queries_only_exported_metrics():
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("throughput", "mfu", "loss", "data wait", "memory", "restarts"):
        assert word in titles
    source = (Path(__file__).resolve().parents[2] / "mim_scale" / "metrics" / "train.py").read_text()
    for expr in exprs:
        for name in re.findall(r"\bmim_[a-z0-9_]+", expr):
            base = re.sub(r"_(sum|count|bucket)$", "", name)
            base = re.sub(r"_total$", "", base)
            assert f'"{base}"' in source, f"dashboard uses {name}, which mim_scale/metrics/train.py does not export"
