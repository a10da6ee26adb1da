"""`mim-scale pretrain ... --rehearse` on a local 2-worker Ray cluster (the session's), on shards of the real CT:
every stage passes, one verdict line each, and only the rehearsal folder is left in the storage. While it runs,
`mim-scale monitor` (the command itself, as a subprocess) is pointed at the rehearsal's run folder and must see
both ranks up in its Prometheus. A broken stage fails the rehearsal and is named."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from mim_scale.cli import main

from launcher_drills import drill_overrides
from prometheus_server import find_binary, free_port

STAGES = ("plan", "train", "kill-resume", "checkpoint", "driver-files", "metrics", "export", "throughput")


def _argv(shards: Path, storage: Path, *extra: str) -> list[str]:
    sets = [x for item in drill_overrides(shards, storage, "drill") if not item.startswith(("launch.storage",
                                                                                         "launch.name"))
            for x in ("--set", item)]
    return ["pretrain", "--config", "tiny", "--storage", str(storage), "--name", "drill", *sets, "--rehearse", *extra]


class MonitorWatch(threading.Thread):
    """Waits for the rehearsal folder, runs `mim-scale monitor FOLDER` on it and records the ranks its Prometheus
    saw up (``up == 1``) at one evaluation."""

    def __init__(self, storage: Path):
        super().__init__(daemon=True)
        self.storage, self.port = storage, free_port()
        self.up_ranks: set[str] = set()
        self.error: str | None = None
        self.done = threading.Event()

    def _query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)["data"]["result"]

    def run(self) -> None:
        folder = None
        while folder is None and not self.done.wait(0.5):
            found = [p for p in self.storage.glob("drill-rehearsal-*") if p.is_dir()]
            folder = found[0] if found else None
        if folder is None:
            return
        proc = subprocess.Popen([sys.executable, "-m", "mim_scale.cli", "monitor", str(folder), "--port", str(self.port),
                                 "--prometheus", str(find_binary()), "--scrape-interval", "1s"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = proc.stdout.readline()
            if not line.startswith("prometheus: "):
                self.error = f"monitor did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
                return
            while not self.done.wait(1.0) and self.up_ranks != {"0", "1"}:
                try:
                    up = self._query('up{job="mim"} == 1')
                except OSError:
                    continue
                self.up_ranks = max(self.up_ranks, {r["metric"].get("rank") for r in up}, key=len)
        finally:
            proc.terminate()  # SIGTERM: monitor takes its Prometheus down
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def rehearsal(sample_shards, ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("rehearse-storage")
    watch = MonitorWatch(storage)
    watch.start()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = main(_argv(sample_shards, storage))
    finally:
        watch.done.set()
        watch.join(timeout=90)
    print(out.getvalue())  # the verdicts, in the test log
    return rc, out.getvalue().splitlines(), storage, watch


def test_rehearse_passes_every_stage(rehearsal):
    rc, lines, storage, _ = rehearsal
    text = "\n".join(lines)
    assert rc == 0, text
    for stage in STAGES:
        assert re.search(rf"^rehearse {re.escape(stage)}\s+ok\s", text, re.M), f"{stage}:\n{text}"
    assert "rehearsal: PASSED" in text
    # measured figures are printed: crops/s, data wait, and each rank scraped
    assert re.search(r"[\d.]+ crops/s on 2 workers", text) and "data wait" in text, text
    assert "rank 0 127.0.0.1:" in text and "rank 1 127.0.0.1:" in text, text
    # nothing but one clearly named rehearsal folder in the run's storage
    (folder,) = list(storage.iterdir())
    assert re.fullmatch(r"drill-rehearsal-\d{8}T\d{6}Z", folder.name), folder.name
    assert (folder / "export" / "encoder.safetensors").is_file()


def test_monitor_sees_both_ranks_of_the_live_run_up(rehearsal):
    _, _, _, watch = rehearsal
    assert watch.error is None, watch.error
    assert watch.up_ranks == {"0", "1"}, f"mim-scale monitor's Prometheus saw ranks {watch.up_ranks} up"


def test_a_broken_stage_fails_the_rehearsal_and_is_named(sample_shards, ray_cluster, tmp_path, capsys):
    storage = tmp_path / "storage"
    storage.mkdir()
    rc = main(_argv(sample_shards, storage, "--rehearse-break", "plan"))
    out = capsys.readouterr().out
    assert rc == 1, out
    assert re.search(r"^rehearse plan\s+FAIL\s+broken on purpose", out, re.M), out
    assert re.search(r"^rehearse train\s+skipped\s+needs plan", out, re.M), out
    assert "rehearsal: FAILED (plan)" in out
    assert list(storage.iterdir()) == []  # a rehearsal that stops at its plan writes nothing
