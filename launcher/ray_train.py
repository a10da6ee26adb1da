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

import logging
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mim_scale.config import Config, from_dict
from mim_scale.engine.loop import Reporter, configure_logging, run_training

log = logging.getLogger("mim_scale.launcher")


class RayReporter(Reporter):
    """Checkpoints go through ``ray.train.report``: each rank hands over its own files, Ray merges them."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self._stack = ExitStack()
        self._scratch: Path | None = None

    def resume_dir(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return Path(self._stack.enter_context(checkpoint.as_directory()))

    def scratch_dir(self, step: int) -> Path:
        self._scratch = Path(tempfile.mkdtemp(prefix=f"mim-ckpt-{step}-"))
        return self._scratch

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None, rank: int) -> None:
        import ray.train
        from ray.train import Checkpoint

        clean = {k: v for k, v in metrics.items() if v is not None}
        if ckpt_dir is None:
            ray.train.report(clean)
            return
        ray.train.report(clean, checkpoint=Checkpoint.from_directory(str(ckpt_dir)))
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    def close(self) -> None:
        self._stack.close()


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    configure_logging()
    cfg = from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    reporter = RayReporter(run_dir)
    try:
        init = Path(loop_config["init"]) if loop_config.get("init") else None
        run_training(cfg, run_dir=run_dir, reporter=reporter, init_weights=init, fault=loop_config.get("fault"))
    finally:
        reporter.close()


@dataclass
class LaunchResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: dict[str, Any]
    error: BaseException | None
    seconds: float


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment every worker needs (workers are separate processes: nothing else is inherited)."""
    env = {
        "OMP_NUM_THREADS": str(max(1, int(cfg.launch.cpus_per_worker))),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
        "MIM_SCALE_LOG": os.environ.get("MIM_SCALE_LOG", "INFO"),
        "PYTHONUNBUFFERED": "1",
    }
    if not cfg.launch.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("MIM_SCALE_SAMPLE_DATA", "TMPDIR", "RAY_AUTH_MODE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def ensure_ray(cfg: Config) -> bool:
    """Connect to ``launch.address`` or start a local cluster; returns True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    env = worker_env(cfg)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if cfg.launch.address:
        ray.init(address=cfg.launch.address, **kwargs)
    else:
        num_cpus = cfg.launch.ray_num_cpus or max(os.cpu_count() or 1, int(cfg.launch.workers * cfg.launch.cpus_per_worker))
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=256 * 2**20, **kwargs)
    return True


def run_name(cfg: Config) -> str:
    return cfg.launch.name or f"{cfg.name or 'mim'}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_root(cfg: Config) -> str:
    storage = cfg.launch.storage
    return storage if "://" in storage else str(Path(storage).resolve())


def pretrain(cfg: Config, *, init: Path | None = None, fault: str | None = None) -> LaunchResult:
    """Run (or resume) pre-training for ``cfg`` on Ray; blocks until it ends.

    ``fault`` injects one failure for drills (``raise:RANK:STEP`` / ``kill:RANK:STEP``, see
    ``mim_scale.engine.loop.parse_fault``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    name = run_name(cfg)
    storage = storage_root(cfg)
    run_dir = Path(storage) / name if "://" not in storage else Path("runs").resolve() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    shards = cfg.data.shards
    if shards and "://" not in shards and not shards.startswith("pipe:"):
        shards = str(Path(shards).resolve())
    cfg = cfg.replace({"data.shards": shards, "launch.name": name})
    t0 = time.perf_counter()
    started = ensure_ray(cfg)
    try:
        resources = {"CPU": cfg.launch.cpus_per_worker}
        if cfg.launch.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "init": str(init) if init else None,
                               "fault": fault},
            scaling_config=ScalingConfig(num_workers=cfg.launch.workers, use_gpu=cfg.launch.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if cfg.launch.use_gpu else "gloo"),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last)),
        )
        error = None
        try:
            result = trainer.fit()
            metrics = dict(result.metrics or {})
            checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
        except Exception as exc:  # noqa: BLE001 - reported to the caller with the run folder
            error, metrics, checkpoint = exc, {}, None
    finally:
        if started:
            ray.shutdown()
    return LaunchResult(run_dir=run_dir, checkpoint=checkpoint, metrics=metrics, error=error,
                        seconds=time.perf_counter() - t0)
