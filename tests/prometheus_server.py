"""A real Prometheus server for tests: Debian's package, unpacked (never installed), on loopback.

The binary comes from ``MIM_SCALE_PROMETHEUS`` or ``<repo>/.cache/prometheus/usr/bin/prometheus``; when
neither exists, ``scripts/install_prometheus.sh`` unpacks it there. When it cannot be obtained the test
FAILS with the reason (a monitoring test that silently skips proves nothing).

    with PrometheusServer.start(tmp_path, static_targets=["127.0.0.1:1234"]) as prom:
        prom.wait_for("mim_steps_total > 0")
        prom.query("mim_loss")
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from mim_scale.engine.local import free_port  # noqa: F401 - also offered to the tests from here

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / "scripts" / "install_prometheus.sh"
CACHE_DIR = REPO / ".cache" / "prometheus"


def _fail(msg: str) -> None:
    pytest.fail(msg, pytrace=False)


def find_binary(name: str = "prometheus") -> Path:
    """Path of ``prometheus`` or ``promtool``, unpacking Debian's package into .cache if needed."""
    env = os.environ.get("MIM_SCALE_PROMETHEUS")
    if env:
        server = Path(env)
        path = server if name == "prometheus" else server.with_name(name)
        if not (path.is_file() and os.access(path, os.X_OK)):
            _fail(f"MIM_SCALE_PROMETHEUS={env}: no executable {path}")
        return path
    path = CACHE_DIR / "usr" / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT), str(CACHE_DIR)], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0 or not path.is_file():
            _fail(
                f"could not obtain the Prometheus binary {path} with {INSTALL_SCRIPT} (rc={proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}. Set MIM_SCALE_PROMETHEUS to a prometheus binary."
            )
    return path


def scrape_config(
    *,
    static_targets: list[str] | None = None,
    file_sd: str | os.PathLike | None = None,
    job: str = "mim",
    interval: str = "1s",
    rule_files: list[str] | None = None,
) -> dict:
    """A minimal prometheus.yml dict scraping ``static_targets`` and/or a file_sd file every ``interval``."""
    job_cfg: dict = {"job_name": job, "scrape_interval": interval, "scrape_timeout": interval}
    if static_targets:
        job_cfg["static_configs"] = [{"targets": list(static_targets)}]
    if file_sd is not None:
        job_cfg["file_sd_configs"] = [{"files": [str(file_sd)], "refresh_interval": interval}]
    cfg: dict = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [job_cfg],
    }
    if rule_files:
        cfg["rule_files"] = list(rule_files)
    return cfg


class PrometheusServer:
    """A running Prometheus; use :meth:`start`, then :meth:`query` / :meth:`wait_for`, then :meth:`stop`."""

    def __init__(self, proc: subprocess.Popen, port: int, workdir: Path, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.workdir = workdir
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(
        cls,
        workdir: str | os.PathLike,
        config: dict | str | os.PathLike | None = None,
        *,
        static_targets: list[str] | None = None,
        file_sd: str | os.PathLike | None = None,
        ready_timeout: float = 30.0,
    ) -> PrometheusServer:
        """Start on an ephemeral loopback port with ``config`` (a dict, or a path to a YAML file) or with a
        config built from ``static_targets`` / ``file_sd``; waits until ``/-/ready`` answers."""
        binary = find_binary("prometheus")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if config is None:
            config = scrape_config(static_targets=static_targets, file_sd=file_sd)
        if isinstance(config, dict):
            config_path = workdir / "prometheus.yml"
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        else:
            config_path = Path(config)
        log_path = workdir / "prometheus.log"
        last_error = ""
        for _ in range(3):  # the port picked may be taken by the time prometheus binds it
            port = free_port()
            data = workdir / f"data-{port}"
            log = open(log_path, "ab")
            proc = subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
            log.close()
            server = cls(proc, port, workdir, log_path)
            try:
                server._wait_ready(ready_timeout)
                return server
            except RuntimeError as exc:
                last_error = str(exc)
                server.stop()
        _fail(f"Prometheus did not start: {last_error}")
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}; log:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"not ready after {timeout}s; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> dict:
        """GET ``/api/v1/<path>``; returns ``data`` or raises ``AssertionError`` with the error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus API {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; returns the result list of ``{"metric": {...}, "value": [ts, "v"]}``."""
        data = self.api("query", query=expr)
        if data["resultType"] not in ("vector", "matrix"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_for(self, expr: str, *, count: int = 1, timeout: float = 30.0) -> list[dict]:
        """Poll ``expr`` until it returns at least ``count`` series; fails with the last answer."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if len(result) >= count:
                return result
            time.sleep(0.25)
        raise AssertionError(
            f"after {timeout}s, {expr!r} returned {len(result)} series (wanted {count}): {result}; "
            f"targets: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in self.targets()]}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for data in self.workdir.glob(f"data-{self.port}"):
            shutil.rmtree(data, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def values(result: list[dict], key: str) -> dict[str, float]:
    """``{label value of key: sample value}`` of an instant-query result."""
    return {r["metric"].get(key, ""): float(r["value"][1]) for r in result}
