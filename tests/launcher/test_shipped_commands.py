"""Every `mim-scale pretrain ...` command shipped anywhere (README, docs/CLUSTER.md, launcher/*.yaml, the Dockerfile)
parses with mim-scale's own argument parser and passes `mim-scale plan` with the same config, overrides and
worker count: an elastic range whose counts do not keep the global batch fails here, not at launch on 32 GPUs.
Plus `plan` itself on elastic ranges that break and keep the batch."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

import mim_scale.launcher as launcher_pkg
from mim_scale.cli import build_parser, main

LAUNCHER = Path(launcher_pkg.__file__).parent
REPO = LAUNCHER.parent
SHIPPED = [REPO / "README.md", REPO / "docs" / "CLUSTER.md", *sorted(LAUNCHER.glob("*.yaml")), LAUNCHER / "Dockerfile"]
PLACEHOLDERS = re.compile(r"^\.\.\.$|^\[|^[A-Z_]{4,}$")  # `...`, `[--set KEY=VALUE ...]`, FILE_OR_PRESET
SHELL_STOP = {"|", "||", "&&", ";", "&", ">", "2>&1"}
VOLUMES = "10000"  # the shards named in the docs are not here: plan with the paper-scale volume count


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _commands_in_line(line: str) -> list[list[str]]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    found = []
    for i, tok in enumerate(tokens):
        if tok == "mim-scale" and i + 1 < len(tokens) and tokens[i + 1] == "pretrain":
            rest = []
            for t in tokens[i + 2:]:
                if t in SHELL_STOP:
                    break
                rest.append(t)
            found.append(rest)
        elif "mim-scale pretrain" in tok and tok != "mim-scale":  # quoted: `ray exec CFG "mim-scale pretrain ..."`
            found.extend(_commands_in_line(tok))
    return found


def shipped_pretrain_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `pretrain`) for every runnable command; synopses with placeholders are left out."""
    out = []
    for path in SHIPPED:
        text = path.read_text()
        if path.suffix == ".yaml":
            lines = [s.replace("\n", " ") for doc in yaml.safe_load_all(text) for s in _strings(doc)
                     if "mim-scale pretrain" in s]
        else:
            lines = re.sub(r"\\\n\s*", " ", text).splitlines()  # shell continuations joined
        for line in lines:
            if "mim-scale pretrain" not in line:
                continue
            for argv in _commands_in_line(line):
                if not any(PLACEHOLDERS.search(t) for t in argv):
                    out.append((f"{path.relative_to(REPO)}: mim-scale pretrain {' '.join(argv)}", argv))
    return out


COMMANDS = shipped_pretrain_commands()


def test_the_shipped_commands_are_found():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    # the cluster job files and the docs each ship at least one; a parser change that finds none fails here
    assert {"README.md", "docs/CLUSTER.md", "launcher/kuberay-rayjob.yaml"} <= where, where
    assert any("ray exec" in line and "mim-scale pretrain" in line
               for line in re.sub(r"\\\n\s*", " ", (REPO / "docs" / "CLUSTER.md").read_text()).splitlines())
    assert any("ray exec" in w or "--address auto" in w for w, _ in COMMANDS)


def plan_argv(argv: list[str]) -> list[str]:
    """`mim-scale plan` with the pretrain command's config, overrides, workers and device."""
    args = build_parser().parse_args(["pretrain", *argv])  # the command must parse as shipped
    out = ["plan", "--config", args.config, "--volumes", VOLUMES]
    for item in args.overrides:
        if not item.startswith("data.shards="):  # the docs' shard paths exist on the cluster only
            out += ["--set", item]
    if args.workers:
        workers, lo = args.workers
        out += ["--workers", f"{lo},{workers}" if lo else str(workers)]
    if args.use_gpu:
        out.append("--use-gpu")
    return out


# commands a document shows being refused (docs/CLUSTER.md, "Rehearse first": a range the batch does not allow)
SHOWN_REFUSED = (("docs/CLUSTER.md", "--workers 24,32"),)


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_shipped_command_passes_plan(where, argv, capsys):
    rc = main(plan_argv(argv))
    err = capsys.readouterr().err
    refused = any(where.startswith(f"{doc}:") and part in where for doc, part in SHOWN_REFUSED)
    expected = 2 if refused else 0
    assert rc == expected, f"{where}\n`mim-scale {' '.join(plan_argv(argv))}` exited {rc}: {err}"


def test_plan_refuses_a_range_that_breaks_the_batch_and_names_the_counts(capsys):
    rc = main(["plan", "--config", "large", "--use-gpu", "--workers", "24,32", "--volumes", VOLUMES])
    err = capsys.readouterr().err
    assert rc == 2
    assert "[24, 25, 26, 27, 28, 29, 30, 31]" in err and "16, 32" in err, err


def test_plan_accepts_a_range_of_counts_that_keep_the_batch(capsys):
    # 128 crops, micro-batch 1: 2 -> 64 accumulation, 1 -> 128; both whole
    assert main(["plan", "--config", "large", "--use-gpu", "--workers", "1,2", "--volumes", VOLUMES]) == 0
    out = capsys.readouterr().out
    assert "128" in out
