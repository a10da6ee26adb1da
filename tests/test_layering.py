"""The import rule of docs/ARCHITECTURE.md, checked on the source: no import cycle between modules, and no
module imports a module of a later stage (shards -> stream -> model -> engine/launcher -> export -> fine-tune;
commands on top). Imports inside functions count too: a lazy import is still a dependency.

Reads the files with ``ast`` (nothing is imported), so it takes well under a second.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed name -> folder in the checkout (pyproject's package-dir)
PACKAGES = {"mim_scale": ROOT / "mim_scale", "mim_scale.shards": ROOT / "shards",
            "mim_scale.launcher": ROOT / "launcher", "mim_scale.ops": ROOT / "ops"}

# Stages in flow order; a module belongs to the stage of its longest matching prefix. A module may import
# modules of its own stage or earlier ones. "base" holds what every stage uses (config, files, the export
# store's integrity checks); "commands" are entry points that drive several stages.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mim_scale.errors", "mim_scale.fileutil", "mim_scale.tomltree", "mim_scale.config", "mim_scale.rundir",
              "mim_scale.export_store", "mim_scale.data.s3cat", "mim_scale.tensorboard", "mim_scale.model_card",
              "mim_scale.console", "mim_scale.ray_session", "mim_scale.configs")),
    ("ops", ("mim_scale.ops",)),
    ("shards", ("mim_scale.shards", "mim_scale.sample_data")),
    ("stream", ("mim_scale.data", "mim_scale.recipe")),
    ("model", ("mim_scale.model",)),
    ("engine", ("mim_scale.engine", "mim_scale.metrics", "mim_scale.pictures")),
    ("launcher", ("mim_scale.launcher",)),
    ("export", ("mim_scale.export", "mim_scale.monai_bundle", "mim_scale.catalogue")),
    ("finetune", ("mim_scale.finetune",)),
    ("commands", ("mim_scale.cli", "mim_scale.quickstart", "mim_scale.doctor", "mim_scale.plan", "mim_scale.monitor",
                  "mim_scale.report", "mim_scale.launcher.cli", "mim_scale.launcher.rehearse", "mim_scale.shards.cli",
                  "mim_scale.finetune.cli")),
]
# The one place the flow loops back, on purpose: `mim-scale export --format monai-bundle` of a fine-tuning run
# packs the fine-tuned network (its builder, recipe and newest checkpoint) beside the encoder's bundle writer.
# Lazy imports inside the fine-tuned-run functions only.
LOOPS_BACK = {("mim_scale.monai_bundle", "mim_scale.finetune.build"),
              ("mim_scale.monai_bundle", "mim_scale.finetune.checkpoint"),
              ("mim_scale.monai_bundle", "mim_scale.finetune.recipe")}
# The package itself: `import mim_scale` reads __version__; its lazy __getattr__ (the public facade over the
# loading API and export) is not an import of the modules that import the package.
FACADE = "mim_scale"


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if "__pycache__" in parts or (pkg == "mim_scale" and parts[0] in ("shards", "launcher", "ops")):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module (or package) an imported name lives in."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module -> the mim_scale modules it imports anywhere in its source (FACADE's own imports left out);
    parsed once per session (the callers only read it)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        if mod != FACADE:
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    deps.update(_owner(a.name, mods) for a in node.names if a.name.startswith("mim_scale"))
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mim_scale"):
                    for a in node.names:
                        full = f"{node.module}.{a.name}"
                        deps.add(_owner(full if full in mods else node.module, mods))
        deps.discard(None)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def stage_of(mod: str) -> int:
    best, rank = -1, len(STAGES) - 1  # a module no stage names is a command until it says otherwise
    if mod == FACADE:
        return 0
    for i, (_name, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_graph_sees_known_imports():
    graph = import_graph()
    assert "mim_scale.model.io" in graph["mim_scale.export"]  # a module-level import
    assert "mim_scale.data.stream" in graph["mim_scale.engine.validate"]
    assert "mim_scale.model.io" in graph["mim_scale.finetune.build"]  # a lazy import inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_no_module_imports_a_later_stage():
    graph = import_graph()
    back = sorted(f"{m} ({STAGES[stage_of(m)][0]}) imports {d} ({STAGES[stage_of(d)][0]})"
                  for m, deps in graph.items() for d in deps if stage_of(d) > stage_of(m) and (m, d) not in LOOPS_BACK)
    assert back == []


def test_every_module_has_a_line_in_the_architecture_doc():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = sorted(str(path.relative_to(ROOT)) for mod, path in _modules().items()
                     if path.name != "__init__.py" and f"`{path.relative_to(ROOT).as_posix()}`" not in doc)
    assert missing == [], f"add a line for each to docs/ARCHITECTURE.md, under its stage: {missing}"
    stale = sorted(p for p in re.findall(r"`((?:mim_scale|shards|launcher|ops)/[\w/]+\.py)`", doc)
                   if not (ROOT / p).is_file())
    assert stale == [], f"docs/ARCHITECTURE.md names modules that do not exist: {stale}"
