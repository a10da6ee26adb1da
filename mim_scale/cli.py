"""The ``mim-scale`` command line: one entry point, one subcommand per stage.

Each stage's package contributes its own subcommands through a ``register(subparsers)`` function,
so this file only wires them together. Only subcommands that work are listed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mim_scale.config import ConfigError
from mim_scale.errors import UserFacingError

# module path -> a function ``register(subparsers)`` that adds that stage's subcommands
_STAGES = (
    "mim_scale.sample_data",
    "mim_scale.quickstart",
    "mim_scale.shards.cli",
    "mim_scale.launcher.cli",
    "mim_scale.export",
    "mim_scale.catalogue",
    "mim_scale.report",
    "mim_scale.finetune.cli",
    "mim_scale.monitor",
    "mim_scale.doctor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mim-scale",
        description="MiM pre-training for 3D CT: shards, Ray + DeepSpeed pre-training, export, fine-tuning.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show everything: every log line of the driver, Ray and every worker (as does "
                             "MIM_SCALE_LOG=LEVEL); by default the terminal shows stages, progress and a summary, "
                             "and the full logs go to files whose paths are printed")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in _STAGES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that stage is not built yet
            raise
        module.register(sub)
    for command in sub.choices.values():  # `mim-scale COMMAND ... --verbose` as well as `mim-scale --verbose ...`
        if "--verbose" not in command._option_string_actions:
            command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                                 help="show everything (see mim-scale --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mim_scale import console

    console.setup(verbose_flag=args.verbose)
    try:
        result = args.func(args)
    except ConfigError as exc:
        print(f"mim-scale: config error: {exc}", file=sys.stderr)
        return 2
    except UserFacingError as exc:
        print(f"mim-scale {args.command}: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
