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


def _pretrain(args: argparse.Namespace) -> int:
    from mim_scale.launcher.ray_train import pretrain

    cfg = config_from_args(args, {"launch.address": args.address, "launch.workers": args.workers,
                                  "launch.use_gpu": True if args.use_gpu else None, "launch.name": args.name,
                                  "launch.storage": args.storage})
    if not cfg.data.shards:
        raise UserFacingError("no shards given: set data.shards in the config or pass --set data.shards=PATH "
                              "(a manifest.json or the folder holding it; build one with `mim-scale shards build`)")
    init = Path(args.init) if args.init else None
    if init is not None and not init.exists():
        raise UserFacingError(f"--init {init}: no such export (expected a folder from `mim-scale export` or a "
                              ".safetensors file)")
    result = pretrain(cfg, init=init)
    print(json.dumps({"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                      "seconds": round(result.seconds, 1),
                      "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}},
                     indent=1))
    if result.error is not None:
        print(f"mim-scale pretrain: the run failed: {result.error}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mim_scale.launcher import ray_train

    p = sub.add_parser("pretrain", help="pre-train MiM on a Ray cluster (a local one by default)",
                       description=ray_train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' or host:port); default: start a local cluster")
    p.add_argument("--workers", type=int, default=None, help="training workers (one per GPU on GPU)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--name", default=None, help="run name; the same name and storage resume the run")
    p.add_argument("--storage", default=None, help="shared path or object-store URI for checkpoints")
    p.add_argument("--init", default=None, metavar="EXPORT_DIR",
                   help="start from an exported encoder (safetensors), never from a pickled checkpoint")
    p.set_defaults(func=_pretrain)
