"""Pre-training on a Ray cluster: Ray Train's TorchTrainer runs one DeepSpeed engine per worker.

CPU, embedded local Ray cluster (2 workers):
    mim-scale pretrain --config tiny --set data.shards=shards/manifest.json
One GPU:
    mim-scale pretrain --config base --use-gpu --workers 1 --set data.shards=/data/shards
Cluster (after `ray start --head` / `ray up launcher/ray-cluster.yaml`):
    mim-scale pretrain --config large --address auto --workers 32 --use-gpu --storage /shared/runs --name large-v1

Failures restart the worker group from the last reported checkpoint (``launch.max_failures``); re-running
the same command (same ``--name`` and ``--storage``) resumes the run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mim_scale import console, rundir
from mim_scale.config import Config, from_dict
from mim_scale.launcher.cluster import ensure_ray, worker_env
from mim_scale.launcher.driver_files import RayRunFiles, start_run_folder
from mim_scale.launcher.elastic import check_elastic, worker_range
from mim_scale.launcher.ray_reporter import RayReporter, parse_ckpt_fault
from mim_scale.metrics import resolve_addr
from mim_scale.rundir import RunFiles
from mim_scale.engine.loop import configure_logging, parse_fault, run_training
from mim_scale.errors import UserFacingError
from mim_scale.recipe import resolve, training_volume_count
from mim_scale.launcher.runs import DriverRecord, clear_stop_request, stop_was_requested

log = logging.getLogger("mim_scale.launcher")

# How often a healthy elastic group looks for room to grow back to launch.workers (a resize restarts the group
# from its last checkpoint, so not too often).
ELASTIC_RESIZE_SECONDS = float(os.environ.get("MIM_SCALE_ELASTIC_RESIZE_SECONDS", "60"))


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import ray.train

    # --env values also reach workers of a Ray that was already initialised in this process (and so
    # has its runtime_env fixed); variables read at import time need the runtime_env itself.
    for key, value in (loop_config.get("extra_env") or {}).items():
        os.environ.setdefault(key, value)
    cfg = from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    with ExitStack() as stack:
        if loop_config.get("quiet"):
            _quiet_worker()
            if loop_config.get("logs_shared") or ray.get_runtime_context().get_node_id() == loop_config.get("driver_node"):
                stack.enter_context(_output_to(run_dir / rundir.worker_log(rank), rank))
        configure_logging()
        try:
            _train_worker(loop_config, cfg, run_dir, rank, world)
        except BaseException as exc:
            _keep_traceback(exc)
            raise


def _keep_traceback(exc: BaseException) -> None:
    """Attach this worker's traceback text to ``exc`` (``exc.mim_traceback``): Ray Train's controller hands its
    callbacks the bare exception, whose traceback does not survive pickling, but its attributes do
    (:func:`mim_scale.launcher.watch.describe_failure` prints it on the driver)."""
    import traceback

    try:
        exc.mim_traceback = "".join(traceback.format_exception(exc))
    except Exception:  # noqa: BLE001 - an exception type that refuses attributes: Ray's text is still there
        pass


def _quiet_worker() -> None:
    """Known noise, turned off where it is made (quiet mode only; --verbose keeps it): torch's deprecation of
    ``all_gather_into_tensor``, raised by DeepSpeed's ZeRO collectives on every rank at every step."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


class _output_to:
    """Context manager: this process's stdout and stderr (file descriptors 1 and 2: Python, DeepSpeed's
    prints, C++ warnings) appended to ``path`` (the run folder's ``logs/rank-N.log``), restored on exit."""

    def __init__(self, path: Path, rank: int):
        self.path, self.rank = path, rank
        self._saved: list[int] = []

    def __enter__(self) -> Path:
        import sys

        self.path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush(), sys.stderr.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, f"==== rank {self.rank}, pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(fd, 1), os.dup2(fd, 2)
        os.close(fd)
        return self.path

    def __exit__(self, *exc) -> None:
        import sys
        import traceback

        if exc[0] is not None and not issubclass(exc[0], (KeyboardInterrupt, SystemExit)):
            traceback.print_exception(*exc, file=sys.stderr)  # the whole traceback, in this rank's log
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(self._saved[0], 1), os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)


def _train_worker(loop_config: dict[str, Any], cfg: Config, run_dir: Path, rank: int, world: int) -> None:
    import ray

    # the driver's run folder, through its actor (mim_scale.launcher.driver_files), whatever node this is
    files = RayRunFiles(loop_config["run_files"], str(run_dir)) if loop_config.get("run_files") else RunFiles(run_dir)
    node_ip = ray.util.get_node_ip_address()
    # /metrics on this node's address when the cluster was joined, loopback on a local one (metrics.addr "auto")
    cfg = cfg.replace({"metrics.addr": resolve_addr(cfg.metrics.addr, node_ip if cfg.launch.address else None)})
    # an elastic group of another size keeps the global batch: run_training resolves the recipe for `world`
    write_worker_record(files, rank, world, loop_config.get("env_names", []), node_ip=node_ip)
    reporter = RayReporter(run_dir, stop_uri=loop_config.get("stop_uri"), ckpt_fault=loop_config.get("ckpt_fault"),
                           rank=rank, run_uri=loop_config.get("run_uri"), files=files)
    try:
        init = Path(loop_config["init"]) if loop_config.get("init") else None
        run_training(cfg, run_dir=run_dir, reporter=reporter, init_weights=init, fault=loop_config.get("fault"))
    finally:
        reporter.close()


def write_worker_record(files: RunFiles, rank: int, world: int, env_names: list[str], node_ip: str | None = None) -> None:
    """``RUN/workers/rank-N.json`` (in the driver's run folder): where this rank runs (host, pid, Ray node and
    its IP), for ``mim-scale status``, and which of the variables the launcher passed on arrived (names only:
    values may be secrets)."""
    import ray

    record = {"rank": rank, "world_size": world, "host": socket.gethostname(), "pid": os.getpid(),
              "node_id": ray.get_runtime_context().get_node_id(), "node_ip": node_ip, "started": time.time(),
              "env": sorted(k for k in env_names if k in os.environ)}
    files.write_text(rundir.worker_record(rank), json.dumps(record))
    for name in files.names(rundir.WORKERS_DIR):  # ranks beyond a shrunk group
        stale = rundir.rank_of(name)
        if stale is not None and stale >= world:
            files.remove(name)


@dataclass
class LaunchResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: dict[str, Any]
    error: BaseException | None
    seconds: float


def check_init(cfg: Config, init: Path) -> Path:
    """Fail on the driver, before any worker starts, if ``init`` does not fit the configured encoder
    (keys and shapes are checked on the meta device: nothing is allocated)."""
    import torch

    from mim_scale.model.io import load_encoder_weights
    from mim_scale.model import build_model

    if not init.exists():
        raise UserFacingError(f"--init {init}: no such export (a folder from `mim-scale export` or a .safetensors file)")
    with torch.device("meta"):
        model = build_model(cfg)
    load_encoder_weights(model.encoder, init, strict=True)
    return init.resolve()


def run_name(cfg: Config) -> str:
    return cfg.launch.name or f"{cfg.name or 'mim'}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_root(cfg: Config) -> str:
    storage = cfg.launch.storage
    return storage if "://" in storage else str(Path(storage).resolve())


def pretrain(cfg: Config, *, init: Path | None = None, fault: str | None = None, ckpt_fault: str | None = None,
             env: dict[str, str] | None = None, show: bool = True) -> LaunchResult:
    """Run (or resume) pre-training for ``cfg`` on Ray; blocks until it ends.

    ``fault`` injects one failure for drills (``raise:RANK:STEP`` / ``kill:RANK:STEP``, see
    ``mim_scale.engine.loop.parse_fault``); ``ckpt_fault`` (``write:RANK:STEP`` /
    ``upload:RANK:STEP``) kills that rank in the middle of saving that step's checkpoint.
    ``env``: more environment for the workers (``--env``).
    ``show``: draw the progress line on stdout and print every worker failure (:mod:`mim_scale.launcher.watch`).
    The driver's full log goes to ``RUN/logs/driver.log``, each worker's output to ``RUN/logs/rank-N.log``.
    """
    name = run_name(cfg)
    storage = storage_root(cfg)
    run_dir = Path(storage) / name if "://" not in storage else Path("runs").resolve() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    with console.log_to_file(run_dir / rundir.DRIVER_LOG):
        return _pretrain(cfg, name, storage, run_dir, init=init, fault=fault, ckpt_fault=ckpt_fault, env=env,
                         show=show)


def _pretrain(cfg: Config, name: str, storage: str, run_dir: Path, *, init: Path | None, fault: str | None,
              ckpt_fault: str | None, env: dict[str, str] | None, show: bool) -> LaunchResult:
    """Checks on the driver, the lease, Ray, the trainer, and the run's record in the run folder."""
    import ray

    from mim_scale.launcher.watch import RunWatcher, describe_failure

    stop_uri = f"{storage.rstrip('/')}/{name}" if "://" in storage else None
    cfg, init = _check_before_launch(cfg, name, run_dir, stop_uri, init=init, fault=fault, ckpt_fault=ckpt_fault)
    from mim_scale.launcher.lease import RunLease

    lease = RunLease.acquire(stop_uri or str(run_dir))  # a second live launch of this run is refused here
    t0 = time.perf_counter()
    progress = console.Progress("pretrain", cfg.train.steps) if show else None
    if progress is not None:
        progress.update(text="starting Ray" if not ray.is_initialized() else "starting the workers")
    try:
        started = ensure_ray(cfg, env)
    except BaseException:
        lease.release()
        if progress is not None:
            progress.close()
        raise
    if started:
        _link_ray_logs(run_dir)
    driver = DriverRecord(run_dir, name=name, storage=storage, address=cfg.launch.address or "local")
    driver.write("running", ray_address=_gcs_address())
    error: BaseException | None = None
    run_files = None
    watcher = None
    try:
        run_files = start_run_folder(str(run_dir))  # workers write targets/history/records here, from any node
        trainer = _make_trainer(cfg, name, storage, run_dir, run_files, init=init, fault=fault, ckpt_fault=ckpt_fault,
                                stop_uri=stop_uri, env=env)
        if progress is not None:
            watcher = RunWatcher(run_dir, cfg.train.steps, progress).start()
        try:
            result = trainer.fit()
            metrics = dict(result.metrics or {})
            checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
        except Exception as exc:  # noqa: BLE001 - reported to the caller with the run folder
            error, metrics, checkpoint = exc, {}, None
            log.info("training failed: %s", exc)  # the whole of it, in RUN/logs/driver.log (the watcher shows it)
    except BaseException as exc:
        driver.write("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if watcher is not None:
            watcher.stop()
            # the failures that ended the run, from the error itself (the controller's event may not be in yet)
            for rank, exc in sorted((getattr(error, "worker_failures", None) or {}).items()):
                watcher.show_failure(rank, describe_failure(exc), tail=None)
        if progress is not None:
            progress.close()
        if run_files is not None:
            ray.kill(run_files)
        if started:
            ray.shutdown()
        lease.release()
    state = "failed" if error is not None else ("stopped" if stop_was_requested(run_dir, stop_uri) else "finished")
    driver.write(state, error=f"{type(error).__name__}: {error}" if error is not None else None,
                 step=metrics.get("step"))
    return LaunchResult(run_dir=run_dir, checkpoint=checkpoint, metrics=metrics, error=error,
                        seconds=time.perf_counter() - t0)


def _check_before_launch(cfg: Config, name: str, run_dir: Path, stop_uri: str | None, *, init: Path | None,
                         fault: str | None, ckpt_fault: str | None) -> tuple[Config, Path | None]:
    """Everything that can fail on the driver, before any worker starts: the elastic range, the drills, the
    ``--init`` export, the recipe, the manifest. Returns the config with absolute shard paths and the run name,
    and the resolved ``--init``; clears a stop request a previous launch of this run left."""
    check_elastic(cfg)
    parse_fault(fault), parse_ckpt_fault(ckpt_fault)  # a mistyped drill fails here, not in every worker
    if init is not None:
        init = check_init(cfg, Path(init))
    resolve(cfg, worker_range(cfg)[1], training_volume_count(cfg))  # a recipe that cannot run fails here, not in workers
    clear_stop_request(run_dir, stop_uri)  # a stop request belongs to the run it stopped, not to its resume
    shards = cfg.data.shards
    if shards and "://" not in shards and not shards.startswith("pipe:"):
        shards = str(Path(shards).resolve())
    cfg = cfg.replace({"data.shards": shards, "launch.name": name})
    if shards:  # a manifest with a pipe:/absolute/../foreign entry is refused here, before any worker starts
        from mim_scale.data.stream import manifest_shards

        manifest_shards(cfg.data)
    return cfg, init


def _make_trainer(cfg: Config, name: str, storage: str, run_dir: Path, run_files, *, init: Path | None,
                  fault: str | None, ckpt_fault: str | None, stop_uri: str | None, env: dict[str, str] | None):
    """Ray Train's TorchTrainer for this run: one :func:`train_worker` per worker (elastic between
    ``launch.min_workers`` and ``launch.workers``), restarts from the last checkpoint, the controller's events
    to the run folder."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mim_scale.launcher.watch import ControllerEvents

    resources = {"CPU": cfg.launch.cpus_per_worker}
    if cfg.launch.use_gpu:
        resources["GPU"] = 1
    lo, hi = worker_range(cfg)
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "init": str(init) if init else None,
                           "fault": fault, "ckpt_fault": ckpt_fault, "stop_uri": stop_uri, "run_files": run_files,
                           "run_uri": f"{storage.rstrip('/')}/{name}",
                           "env_names": sorted(worker_env(cfg, env)), "extra_env": dict(env or {}),
                           # quiet: each worker's output to RUN/logs/rank-N.log, where the run folder is
                           # reachable (a shared storage path, or the driver's node)
                           "quiet": not console.verbose(), "logs_shared": "://" not in storage,
                           "driver_node": ray.get_runtime_context().get_node_id()},
        scaling_config=ScalingConfig(num_workers=hi if lo == hi else (lo, hi), use_gpu=cfg.launch.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=ELASTIC_RESIZE_SECONDS),
        torch_config=TorchConfig(backend="nccl" if cfg.launch.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
                             # checkpoints and worker failures as the controller sees them -> RUN/logs/events.jsonl
                             callbacks=[ControllerEvents(run_files)]),
    )


def describe_error(error: BaseException) -> str:
    """One line per failed worker for a failed run (the tracebacks were printed by the watcher and are in the
    workers' log files); any other error as its type and first line."""
    from mim_scale.launcher.watch import describe_failure

    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        parts = []
        for rank, exc in sorted(failures.items()):
            f = describe_failure(exc)
            first = next((ln.strip() for ln in f["message"].splitlines() if ln.strip()), "")
            parts.append(f"rank {rank}: " + (f"{f['type']}: {first}" if f["kind"] == "error" else f"process died ({first})"))
        return "; ".join(parts)
    first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
    return f"{type(error).__name__}: {first}"


def _link_ray_logs(run_dir: Path) -> None:
    """``RUN/logs/ray``: a link to the session logs of the Ray cluster this driver started (raylet, GCS,
    controller, every worker process's own files), so that the run folder leads to every log."""
    try:
        import ray._private.worker as ray_worker  # the session folder has no public accessor

        target = Path(ray_worker._global_node.get_logs_dir_path())
        link = run_dir / rundir.RAY_LOGS_LINK
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    except Exception as exc:  # noqa: BLE001 - informational only
        log.info("no link to Ray's session logs: %s", exc)


def _gcs_address() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - informational only
        return None
