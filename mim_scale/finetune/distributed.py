"""Fine-tuning on several workers with Ray Train (the same machinery as pre-training).

Every worker runs :func:`mim_scale.finetune.train.finetune` inside the process group Ray creates
(gloo on CPU, NCCL on GPU); the model is wrapped in DistributedDataParallel, ``train.batch_size`` is
the global batch split across the workers (rank ``r`` takes samples ``r, r + W, ...`` of the batch
the single-process run would draw), and rank 0 alone validates and writes checkpoints, so a run on
W workers follows the single-process run's trajectory up to floating-point summation order. The run
folder must be on storage every worker sees (one machine, or a shared filesystem).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from mim_scale.errors import UserFacingError
from mim_scale.finetune.checkpoint import read_json


def _worker(loop_config: dict[str, Any]) -> None:
    from mim_scale.finetune.train import finetune

    finetune(loop_config["data"], loop_config["init"], loop_config["out"], recipe=loop_config["recipe"],
             overrides=loop_config["overrides"], model_config=loop_config["model_config"],
             resume=loop_config["resume"], log=lambda m: print(m, flush=True))


def finetune_on_workers(data: str | Path, init: str, out: str | Path, *, workers: int, use_gpu: bool = False,
                        address: str = "", recipe: str | Path | None = None, overrides: list[str] | None = None,
                        model_config: str | None = None, resume: bool = False,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run :func:`finetune` on ``workers`` Ray Train workers; return rank 0's summary."""
    if workers < 1:
        raise UserFacingError(f"--workers must be >= 1, got {workers}")
    if recipe is not None and not isinstance(recipe, (str, Path)):
        raise UserFacingError("multi-worker fine-tuning takes the recipe as a shipped name or a file")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mim_scale.config import load_config
    from mim_scale.launcher.cluster import ensure_ray

    out = Path(out).resolve()
    cfg = load_config("tiny", [f"launch.workers={workers}", f"launch.use_gpu={str(use_gpu).lower()}",
                               f'launch.address="{address}"'])
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = ensure_ray(cfg, env)
    try:
        # scratch and s3:// URIs pass as they are (each worker pulls into its node's verified cache)
        keep = init == "scratch" or str(init).startswith("s3://")
        loop_config = {"data": str(Path(data).resolve()), "init": init if keep else str(Path(init).resolve()),
                       "out": str(out), "recipe": str(recipe) if recipe is not None else None,
                       "overrides": list(overrides or []), "model_config": model_config, "resume": resume}
        trainer = TorchTrainer(
            _worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=f"finetune-{out.name}", storage_path=str(out.parent / ".ray_finetune")),
        )
        log(f"fine-tuning on {workers} Ray workers ({'GPU' if use_gpu else 'CPU'}) into {out}")
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    return read_json(out / "summary.json")
