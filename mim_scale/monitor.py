"""``mim-scale monitor RUN_DIR``: a local Prometheus watching one run, in one command.

It copies the shipped ``launcher/monitoring/prometheus.yml`` and ``alerts.yml`` into
``RUN_DIR/monitor/``, points the file_sd entry at the run's targets (one file per rank, which every worker
sends to the driver's run folder: ``RUN_DIR/prometheus_targets/*.json``, :mod:`mim_scale.rundir`), and starts
Prometheus on ``127.0.0.1:PORT`` with its data in ``RUN_DIR/monitor/data``. Nothing is installed and no daemon
is left behind: the server runs in the foreground until Ctrl-C, SIGTERM (or ``--duration`` seconds), and is
stopped with it.

The binary comes from ``--prometheus``, else ``MIM_SCALE_PROMETHEUS``, else ``prometheus`` on PATH,
else the unpacked Debian package of ``scripts/install_prometheus.sh .cache/prometheus`` in a checkout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from mim_scale import rundir
from mim_scale.errors import UserFacingError


def monitoring_dir() -> Path:
    """Folder with the shipped prometheus.yml, alerts.yml, alerts_test.yml and grafana-dashboard.json."""
    import mim_scale.launcher

    return Path(mim_scale.launcher.__file__).resolve().parent / "monitoring"


def find_prometheus(explicit: str | os.PathLike | None = None) -> Path:
    """Locate the prometheus binary (see the module docstring); raises UserFacingError with the fix."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("MIM_SCALE_PROMETHEUS"):
        candidates.append(Path(os.environ["MIM_SCALE_PROMETHEUS"]))
    else:
        on_path = shutil.which("prometheus")
        if on_path:
            candidates.append(Path(on_path))
        checkout = Path(__file__).resolve().parents[1]
        candidates.append(checkout / ".cache" / "prometheus" / "usr" / "bin" / "prometheus")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise UserFacingError(
        f"no prometheus binary (looked at {', '.join(map(str, candidates))}). Unpack Debian's package "
        "without installing a daemon with `scripts/install_prometheus.sh .cache/prometheus`, or pass "
        "--prometheus PATH / set MIM_SCALE_PROMETHEUS."
    )


def write_local_config(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    targets_file: str | os.PathLike | None = None,
    scrape_interval: str = "5s",
) -> Path:
    """Write ``out_dir/prometheus.yml`` (default ``RUN_DIR/monitor``) watching the run's targets file.

    The shipped config is kept (job name, honor_labels, alert rules); only the file_sd path and the
    intervals change. Returns the config path.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserFacingError(f"{run_dir}: not a run directory (it does not exist)")
    out = Path(out_dir) if out_dir is not None else run_dir / rundir.MONITOR_DIR
    out.mkdir(parents=True, exist_ok=True)
    targets = Path(targets_file) if targets_file else rundir.targets_glob(run_dir)
    src = monitoring_dir()
    cfg = yaml.safe_load((src / "prometheus.yml").read_text())
    shutil.copy(src / "alerts.yml", out / "alerts.yml")
    cfg["global"]["scrape_interval"] = scrape_interval
    cfg["global"]["evaluation_interval"] = scrape_interval
    cfg["rule_files"] = [str((out / "alerts.yml").resolve())]
    for job in cfg["scrape_configs"]:
        job["scrape_interval"] = scrape_interval
        job["scrape_timeout"] = scrape_interval
        job["file_sd_configs"] = [{"files": [str(targets.parent.resolve() / targets.name)],
                                   "refresh_interval": scrape_interval}]
    path = out / "prometheus.yml"
    path.write_text(
        f"# Written by `mim-scale monitor` from {src / 'prometheus.yml'}; edit that one.\n"
        + yaml.safe_dump(cfg, sort_keys=False)
    )
    return path


def is_loopback(addr: str) -> bool:
    """True for a listen address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or "" (every interface): not loopback


def start_local_prometheus(
    run_dir: str | os.PathLike,
    *,
    port: int = 9090,
    addr: str = "127.0.0.1",
    binary: str | os.PathLike | None = None,
    targets_file: str | os.PathLike | None = None,
    scrape_interval: str = "5s",
    ready_timeout: float = 30.0,
) -> subprocess.Popen:
    """Start Prometheus for ``run_dir`` on ``addr:port`` and wait until it is ready.

    Returns the process (its log is ``RUN_DIR/monitor/prometheus.log``); the caller stops it with
    ``terminate()``. Raises UserFacingError when the binary is missing or the server does not start.
    """
    exe = find_prometheus(binary)
    config = write_local_config(run_dir, targets_file=targets_file, scrape_interval=scrape_interval)
    out = config.parent
    log_path = out / "prometheus.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                str(exe),
                f"--config.file={config}",
                f"--storage.tsdb.path={out / 'data'}",
                f"--web.listen-address={addr}:{port}",
                # the lifecycle API (POST /-/quit, /-/reload) takes no credentials: only where nobody else connects
                *(["--web.enable-lifecycle"] if is_loopback(addr) else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=out,
        )
    host = "127.0.0.1" if addr in ("", "0.0.0.0") else addr
    deadline = time.monotonic() + ready_timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise UserFacingError(f"prometheus exited with {proc.returncode} (log {log_path}):\n{tail}")
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return proc
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
    except BaseException:  # Ctrl-C while waiting: Prometheus goes too
        _stop_child(proc)
        raise
    proc.terminate()
    proc.wait(timeout=10)
    raise UserFacingError(f"prometheus on {addr}:{port} not ready after {ready_timeout}s (log {log_path})")


def _run(args: argparse.Namespace) -> int:
    """Serve until Prometheus exits, ``--duration`` passes, Ctrl-C or SIGTERM; Prometheus always goes with us.

    SIGTERM only sets a flag (a handler that raised could land between starting Prometheus and the ``try``
    that stops it, and leave it running); the wait below polls the flag."""
    stop = threading.Event()
    try:  # before the child exists: no window without it
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    except ValueError:  # not the main thread (embedded, tests): the caller owns the signals
        return _serve(args, stop)
    try:
        return _serve(args, stop)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(args: argparse.Namespace, stop: threading.Event) -> int:
    proc = start_local_prometheus(
        args.run_dir,
        port=args.port,
        addr=args.addr,
        binary=args.prometheus,
        targets_file=args.targets,
        scrape_interval=args.scrape_interval,
    )
    try:
        host = "127.0.0.1" if args.addr in ("", "0.0.0.0") else args.addr
        run_dir = Path(args.run_dir)
        targets = Path(args.targets) if args.targets else rundir.targets_glob(run_dir)
        print(f"prometheus: http://{host}:{args.port}  (pid {proc.pid}, log {run_dir / rundir.MONITOR_DIR / 'prometheus.log'})")
        print(f"targets file: {targets}")
        print(f"try: curl 'http://{host}:{args.port}/api/v1/query?query=mim_step'")
        sys.stdout.flush()
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while proc.poll() is None and not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_child(proc)
    # stopped by us (SIGTERM) or asked to quit: success; anything else is Prometheus failing
    return 0 if proc.returncode in (0, -15) else proc.returncode


def _stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "monitor",
        help="start a local Prometheus scraping a run's workers (foreground, Ctrl-C stops it)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (holds prometheus_targets/rank-N.json)")
    p.add_argument("--port", type=int, default=9090, help="Prometheus listen port (default 9090)")
    p.add_argument("--addr", default="127.0.0.1", help="Prometheus listen address (default 127.0.0.1)")
    p.add_argument("--targets", default=None,
                   help="file_sd targets file or pattern (default RUN_DIR/prometheus_targets/*.json)")
    p.add_argument("--prometheus", default=None, help="prometheus binary (default: see below)")
    p.add_argument("--scrape-interval", default="5s", help="scrape and rule interval (default 5s)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)")
    p.set_defaults(func=_run)
