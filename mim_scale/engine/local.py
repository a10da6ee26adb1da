"""Run the training loop on N local processes without Ray: ``torch.multiprocessing`` spawn + gloo.

Used by the engine tests and benchmarks, and handy for debugging a config on one machine::

    python -m mim_scale.engine.local --config tiny --workers 2 --run-dir /tmp/run --set data.shards=...

Each process gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT like under ``torchrun``, runs
:func:`mim_scale.engine.loop.run_training` with the local :class:`~mim_scale.engine.loop.Reporter`
(checkpoints under ``<run_dir>/checkpoints/step_*``), and writes its last metrics to
``<run_dir>/results/rank-<r>.json``. If any process dies (an exception, or SIGKILL), the others are
terminated and :func:`launch_local` raises :class:`WorkerFailed`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from mim_scale.config import Config, from_dict, load_config


class WorkerFailed(RuntimeError):
    """A local worker process died or raised; the others were terminated."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Job:
    """One training run: the config, its run folder, and optional failure drills.

    fault: ``kill:RANK:STEP`` / ``raise:RANK:STEP`` (see ``loop.parse_fault``); sigterm_at: (rank, step)
    after which that rank (only) receives SIGTERM.
    """

    cfg: Config
    run_dir: Path
    fault: str | None = None
    sigterm_at: tuple[int, int] | None = None


def _worker(rank: int, world: int, port: int, jobs: list[tuple[dict, str, str | None, tuple[int, int] | None]],
            env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from mim_scale.engine.loop import Reporter, configure_logging, run_training

    configure_logging()
    for cfg_tree, run_dir, fault, sigterm_at in jobs:
        # launch.workers describes the group that was launched: here, these processes (a batch stated as
        # workers x micro_batch x grad_accum then means this world; train.global_batch_crops is kept as set)
        cfg = from_dict(cfg_tree).replace({"launch.workers": world, "launch.min_workers": 0})
        out = Path(run_dir) / "results"
        out.mkdir(parents=True, exist_ok=True)
        steps_log = out / f"rank-{rank}-steps.jsonl"

        def on_step(metrics: dict, sigterm_at=sigterm_at, steps_log=steps_log) -> None:
            with open(steps_log, "a") as f:
                f.write(json.dumps({k: metrics.get(k) for k in ("step", "samples_seen", "total", "data_digest",
                                                                 "corrupt_skipped", "step_seconds",
                                                                 "data_wait_seconds")}) + "\n")
            # failure drill: SIGTERM to this rank only, as a scheduler's preemption notice would arrive
            if sigterm_at is not None and (rank, metrics["step"]) == tuple(sigterm_at):
                os.kill(os.getpid(), signal.SIGTERM)

        result = run_training(cfg, run_dir=Path(run_dir), reporter=Reporter(Path(run_dir), keep_last=cfg.train.keep_last),
                              on_step=on_step, fault=fault)
        (out / f"rank-{rank}.json").write_text(json.dumps(result, default=float))
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_jobs(jobs: list[Job], workers: int, *, env: dict[str, str] | None = None) -> list[list[dict[str, Any]]]:
    """Run ``jobs`` one after the other in the same ``workers`` processes (one process group, one start-up
    cost); returns, per job, each rank's last metrics. Raises :class:`WorkerFailed` if a process fails."""
    for job in jobs:
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        for old in (Path(job.run_dir) / "results").glob("rank-*.json"):
            old.unlink()
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "mim-scale" / "torch_extensions")),
           **(env or {})}
    specs = [(j.cfg.to_dict(), str(j.run_dir), j.fault, j.sigterm_at) for j in jobs]
    try:
        mp.start_processes(_worker, args=(workers, free_port(), specs, env), nprocs=workers, join=True,
                           start_method="spawn")
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
        raise WorkerFailed(str(exc)) from exc
    return [[json.loads((Path(j.run_dir) / "results" / f"rank-{r}.json").read_text()) for r in range(workers)]
            for j in jobs]


def launch_local(cfg: Config, run_dir: str | Path, workers: int, *, fault: str | None = None,
                 sigterm_at: tuple[int, int] | None = None, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Train ``cfg`` on ``workers`` local processes; returns each rank's last metrics (rank order)."""
    return launch_jobs([Job(cfg, Path(run_dir), fault, sigterm_at)], workers, env=env)[0]


def step_log(run_dir: str | Path, rank: int = 0) -> list[dict[str, Any]]:
    """Per-step records (step, samples_seen, total, data_digest, ...) a rank wrote, in order."""
    path = Path(run_dir) / "results" / f"rank-{rank}-steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mim_scale.engine.local", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    results = launch_local(load_config(args.config, args.set), args.run_dir, args.workers)
    print(json.dumps(results[0], indent=1, default=float))


if __name__ == "__main__":
    main()
