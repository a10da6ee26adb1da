"""One loader for the TOML trees behind pre-training configs and fine-tuning recipes.

A tree is a TOML file (or a name shipped in ``mim_scale/configs``) that may say ``extends = "NAME_OR_FILE"``
to start from another tree (a file beside it first, else a shipped name), then ``--set section.key=value``
overrides (TOML values; a bare word is a string). The tree is built into frozen, typed dataclasses by
:func:`build_dataclass`; every problem raises :class:`ConfigError` naming the dotted key.

Users: :mod:`mim_scale.config` (``tiny``, ``base``, ... and YAML files too) and
:mod:`mim_scale.finetune.recipe` (``finetune_<name>.toml``). Each section's dataclass checks its own
fields with :func:`require` / :func:`choice`, next to the fields.

Usage::

    TREES = TreeSource("config", shipped=lambda n: f"{n}.toml", names=lambda: ["tiny"], yaml=True)
    tree = apply_overrides(TREES.read("tiny"), ["train.steps=20"])
    cfg = build_dataclass(Config, tree, "")
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key at fault."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


# ---------------------------------------------------------------------------------------------
# reading files and shipped names


@dataclass(frozen=True)
class TreeSource:
    """Where one kind of tree comes from.

    ``what`` is the key named by file errors ("config", "recipe"); ``shipped_file(name)`` is the resource
    file name of a shipped tree in ``mim_scale/configs``; ``names()`` lists the shipped names for the error
    message; ``yaml`` accepts ``.yaml``/``.yml`` files; ``atomic_tables`` are tables an extending tree
    replaces whole instead of merging key by key (a dataset mixture is one choice, not a patch).
    """

    what: str
    shipped_file: Callable[[str], str]
    names: Callable[[], list[str]]
    yaml: bool = False
    atomic_tables: frozenset[str] = frozenset()

    def read(self, source: str | Path, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
        """The raw tree of a shipped name or a file, with ``extends`` resolved; ``name`` defaults to its stem.
        An ``extends`` chain that comes back to a tree it already read is a ConfigError naming the chain."""
        source = str(source)
        path = Path(source)
        key = source if not path.exists() else str(path.resolve())
        if key in _chain:
            raise ConfigError(self.what, f"'extends' loops back: {' -> '.join((*_chain, key))}")
        _chain = (*_chain, key)
        if not path.exists() and "/" not in source and not path.suffix:
            shipped = resources.files("mim_scale.configs").joinpath(self.shipped_file(source))
            if not shipped.is_file():
                raise ConfigError(self.what, f"no file {source!r} and no shipped {self.what} of that name "
                                  f"(shipped: {', '.join(self.names())})")
            tree = tomllib.loads(shipped.read_text())
            tree.setdefault("name", source)
            base_dir = None
        else:
            tree = self._read_file(path)
            tree.setdefault("name", path.stem)
            base_dir = path.parent
        return self._resolve_extends(tree, base_dir, _chain)

    def _read_file(self, path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise ConfigError(self.what, f"file not found: {path}")
        text = path.read_text()
        try:
            if self.yaml and path.suffix in (".yaml", ".yml"):
                import yaml

                tree = yaml.safe_load(text) or {}
            else:
                tree = tomllib.loads(text)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ConfigError(self.what, f"cannot parse {path}: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(self.what, f"{path} must hold a table of sections")
        return tree

    def _resolve_extends(self, tree: dict[str, Any], base_dir: Path | None, chain: tuple[str, ...]) -> dict[str, Any]:
        """Merge ``tree`` over the tree its ``extends`` key names (a file beside it, else a shipped name)."""
        parent = tree.pop("extends", None)
        if parent:
            if base_dir is not None and (base_dir / parent).is_file():
                parent = str(base_dir / parent)
            tree = self.merge(self.read(parent, chain), tree)
        return tree

    def merge(self, base: dict, top: dict) -> dict:
        """``top`` over ``base``, table by table (``atomic_tables`` replaced whole); neither is modified."""
        out = dict(base)
        for key, value in top.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in self.atomic_tables:
                out[key] = self.merge(out[key], value)
            else:
                out[key] = value
        return out


# ---------------------------------------------------------------------------------------------
# --set overrides


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str] | dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``key=value`` strings (TOML values) or ``{dotted.key: value}`` applied in place."""
    items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides)
    for key, value in items:
        _set_dotted(tree, key, value)
    return tree


def split_override(item: str) -> tuple[str, Any]:
    """``"train.steps=20"`` -> ``("train.steps", 20)``; a value that is not TOML stays a string (a path)."""
    if "=" not in item:
        raise ConfigError(item, "an override must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as a path
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# typed building


def build_dataclass(cls: type, tree: Any, prefix: str):
    """An instance of the dataclass ``cls`` from a plain tree: unknown keys and wrong types raise
    :class:`ConfigError` naming ``prefix.key``; missing keys keep the field defaults. Ranges are the
    dataclasses' own business (their ``check`` methods)."""
    if not isinstance(tree, dict):
        raise ConfigError(prefix or "config", f"expected a table, got {type(tree).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in tree:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(where, f"unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        kwargs[f.name] = _coerce(hints[f.name], tree[f.name], where)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str):
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"expected a list, got {value!r}")
        return tuple(_coerce(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, val_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a table, got {value!r}")
        return {str(k): _coerce(val_type, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(where, "union types are not supported in config")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(where, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"expected a string, got {value!r}")
        return value
    raise ConfigError(where, f"unsupported type {hint}")


# ---------------------------------------------------------------------------------------------
# checks used by each section's ``check`` method


def require(ok: bool, key: str, reason: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, reason)


def choice(value: str, key: str, options: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``value`` is one of ``options``."""
    require(value in options, key, f"must be one of {', '.join(options)}, got {value!r}")
