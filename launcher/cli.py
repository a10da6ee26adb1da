"""``mim-scale pretrain``: launch (or resume) MiM pre-training on Ray."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mim_scale.config import Config, load_config
from mim_scale.errors import UserFacingError


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE_OR_NAME",
                   help="a TOML/YAML config file or a shipped preset: tiny, base, large, huge")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=20 (repeatable)")


def config_from_args(args: argparse.Namespace, extra: dict | None = None) -> Config:
    """The config named by --config, with --set overrides and the given flag values applied on top."""
    cfg = load_config(args.config, args.overrides)
    if extra:
        cfg = cfg.replace({k: v for k, v in extra.items() if v is not None})
    return cfg


def _workers(text: str) -> tuple[int, int | None]:
    """``N`` (a fixed group) or ``MIN,MAX`` (an elastic group)."""
    try:
        parts = [int(p) for p in text.replace("-", ",").split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected N or MIN,MAX") from exc
    if len(parts) == 1:
        return parts[0], None
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected N or MIN,MAX with 1 <= MIN <= MAX")
    return parts[1], parts[0]


def _env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env {text!r}: expected KEY=VALUE")
    return key, value


def _pretrain(args: argparse.Namespace) -> int:
    from mim_scale.launcher.ray_train import pretrain

    workers, min_workers = args.workers if args.workers else (None, None)
    cfg = config_from_args(args, {"launch.address": args.address, "launch.workers": workers,
                                  "launch.min_workers": min_workers,
                                  "launch.use_gpu": True if args.use_gpu else None, "launch.name": args.name,
                                  "launch.storage": args.storage})
    if not cfg.data.shards:
        raise UserFacingError("no shards given: set data.shards in the config or pass --set data.shards=PATH "
                              "(a manifest.json or the folder holding it; build one with `mim-scale shards build`)")
    init = Path(args.init) if args.init else None
    if args.rehearse:
        from mim_scale.launcher.rehearse import rehearse

        return rehearse(cfg, steps=args.rehearse_steps, price_per_device_hour=args.price_per_device_hour,
                        break_stage=args.rehearse_break, init=init, env=dict(args.env))
    from mim_scale import console, rundir
    from mim_scale.launcher.ray_train import describe_error
    from mim_scale.plan import format_plan, make_plan

    if not args.json:
        print(format_plan(make_plan(cfg)), flush=True)  # the recipe every worker resolves again (RUN/recipe.json)
    result = pretrain(cfg, init=init, fault=args.fault, env=dict(args.env), show=not args.json)
    if args.json:
        print(json.dumps({"run_dir": str(result.run_dir),
                          "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                          "seconds": round(result.seconds, 1), "error": describe_error(result.error) if result.error else None,
                          "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}},
                         indent=1))
    logs = result.run_dir / rundir.LOGS_DIR
    if result.error is not None:
        console.error(f"mim-scale pretrain: the run failed: {describe_error(result.error)}\n"
                      f"  logs: {logs} (driver.log, rank-N.log, events.jsonl)\n"
                      f"  resume: the same command (same --name and --storage) continues from the last checkpoint")
        return 1
    if not args.json:
        m = result.metrics
        losses = ", ".join(f"{k} {m[k]:.4f}" for k in m if k.startswith(("total", "rec_", "val_rec_"))
                           and isinstance(m[k], (int, float)))
        console.out(f"\npre-training done in {console.fmt_seconds(result.seconds)}: step {m.get('step')}, {losses}")
        console.out(console.table([
            ("run folder", str(result.run_dir)),
            ("checkpoint", str(result.checkpoint)),
            ("pictures", str(result.run_dir / rundir.PICTURES_DIR)),
            ("TensorBoard", f"tensorboard --logdir {result.run_dir.parent}"),
            ("logs", f"{logs} (driver.log, rank-N.log, events.jsonl)"),
        ]))
        console.out("\nNext:\n" + console.table([
            ("the run", f"mim-scale report {result.run_dir}"),
            ("export", f"mim-scale export {result.run_dir} --out EXPORT_DIR"),
        ]))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from mim_scale.plan import format_plan, make_plan

    workers, min_workers = args.workers if args.workers else (None, None)
    cfg = config_from_args(args, {"launch.workers": workers, "launch.min_workers": min_workers,
                                  "launch.use_gpu": True if args.use_gpu else None})
    plan = make_plan(cfg, training_volumes=args.volumes, device=args.device, workers_per_node=args.workers_per_node)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan))
    lo, hi = plan.elastic_range
    bad = [w for w in range(lo, hi + 1) if w not in plan.allowed_workers]
    if bad:
        print(f"mim-scale plan: with {bad} workers the global batch of {plan.recipe.crops_per_step} crops does not "
              f"split; worker counts that keep it: {', '.join(map(str, plan.allowed_workers))}", file=sys.stderr)
        return 2
    return 0


def _status(args: argparse.Namespace) -> int:
    from mim_scale.launcher.runs import format_status, resolve_run, run_status

    status = run_status(resolve_run(args.run, args.storage), probe=not args.no_probe)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from mim_scale.launcher.runs import format_status, request_stop, resolve_run

    folder = resolve_run(args.run, args.storage)
    status = request_stop(folder, wait_seconds=args.wait)
    print(f"stop requested for {folder}: the workers save a checkpoint at the next step and end")
    if args.wait:
        print(format_status(status))
        return 0 if status["state"] != "running" else 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mim_scale import plan as plan_module
    from mim_scale.launcher import ray_train, runs

    p = sub.add_parser("pretrain", help="pre-train MiM on a Ray cluster (a local one by default)",
                       description=ray_train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' or host:port); default: start a local cluster")
    p.add_argument("--workers", type=_workers, default=None, metavar="N|MIN,MAX",
                   help="training workers (one per GPU on GPU); MIN,MAX makes the group elastic: it restarts "
                        "smaller when nodes go and grows back when they return (the global batch stays the same)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--name", default=None, help="run name; the same name and storage resume the run")
    p.add_argument("--storage", default=None, help="shared path or object-store URI for checkpoints")
    p.add_argument("--init", default=None, metavar="EXPORT_DIR",
                   help="start from an exported encoder (safetensors), never from a pickled checkpoint")
    p.add_argument("--env", type=_env, action="append", default=[], metavar="KEY=VALUE",
                   help="environment for every worker (repeatable; names in $MIM_SCALE_FORWARD_ENV are passed on too)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (no plan, no progress line)")
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # failure drills: raise|kill:RANK:STEP
    p.add_argument("--rehearse", action="store_true",
                   help="rehearse this run on its cluster first: a few steps, a checkpoint, a worker kill and the "
                        "resume, an export, every rank's /metrics, measured crops/s and projected cost; one verdict "
                        "per stage, exit 1 on any failure; writes only STORAGE/NAME-rehearsal-<time>")
    p.add_argument("--rehearse-steps", type=int, default=4, metavar="N", help="optimizer steps of the rehearsal (>= 4)")
    p.add_argument("--price-per-device-hour", type=float, default=None, metavar="PRICE",
                   help="with --rehearse: cost of the projected device-hours at this price")
    p.add_argument("--rehearse-break", default=None, help=argparse.SUPPRESS)  # drill: make that stage fail
    p.set_defaults(func=_pretrain)

    q = sub.add_parser("plan", help="what a pre-training run will do and cost: batch, lr, schedule, FLOPs, memory, "
                                    "projected hours", description=plan_module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(q)
    q.add_argument("--workers", type=_workers, default=None, metavar="N|MIN,MAX", help="as for pretrain")
    q.add_argument("--use-gpu", action="store_true", help="plan for GPU workers")
    q.add_argument("--volumes", type=int, default=None, metavar="N",
                   help="training volumes (default: the count in data.shards' manifest)")
    q.add_argument("--device", default=None, help="device whose measured throughput to project with (e.g. H100; "
                                                   "default H200 on GPU, cpu otherwise)")
    q.add_argument("--workers-per-node", type=int, default=None, metavar="N",
                   help="workers sharing one node's storage link (default 8 on GPU)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_plan)

    s = sub.add_parser("status", help="where a run stands: step, samples, last checkpoint, restarts, workers",
                       description=runs.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", help="run name (under --storage), run folder, or URI")
    s.add_argument("--storage", default=None, help="where runs live (default: ./runs)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--no-probe", action="store_true", help="do not contact the workers' /metrics")
    s.set_defaults(func=_status)

    t = sub.add_parser("stop", help="ask a run to save a checkpoint and stop",
                       description=runs.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("run", help="run name (under --storage), run folder, or URI")
    t.add_argument("--storage", default=None, help="where runs live (default: ./runs)")
    t.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for the run to end")
    t.set_defaults(func=_stop)
