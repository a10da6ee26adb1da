"""The one TOML tree loader shared by configs and fine-tuning recipes (mim_scale.tomltree)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mim_scale.tomltree import ConfigError, TreeSource, apply_overrides, build_dataclass


@dataclass(frozen=True)
class _Inner:
    steps: int = 1
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Outer:
    train: _Inner = field(default_factory=_Inner)
    name: str = ""


def _source(atomic: frozenset[str] = frozenset()) -> TreeSource:
    return TreeSource("thing", shipped_file=lambda n: f"{n}.toml", names=lambda: ["tiny"], atomic_tables=atomic)


def test_extends_a_file_beside_it_and_atomic_tables_replace_whole(tmp_path):
    (tmp_path / "base.toml").write_text('[train]\nsteps = 5\n[train.weights]\na = 1.0\nb = 2.0\n')
    (tmp_path / "top.toml").write_text('extends = "base.toml"\n[train.weights]\nc = 3.0\n')
    merged = _source().read(tmp_path / "top.toml")
    assert merged["train"] == {"steps": 5, "weights": {"a": 1.0, "b": 2.0, "c": 3.0}}
    assert merged["name"] == "top"
    whole = _source(frozenset({"weights"})).read(tmp_path / "top.toml")
    assert whole["train"] == {"steps": 5, "weights": {"c": 3.0}}


def test_overrides_are_toml_values_and_errors_name_the_key(tmp_path):
    tree = apply_overrides({"train": {"steps": 5}}, ["train.steps=7", "name=some/path"])
    assert build_dataclass(_Outer, tree, "") == _Outer(_Inner(7), "some/path")
    with pytest.raises(ConfigError, match=r"^train\.steps: expected an integer"):
        build_dataclass(_Outer, apply_overrides(tree, ['train.steps="7"']), "")
    with pytest.raises(ConfigError, match=r"^name: is a value, not a section"):
        apply_overrides(tree, ["name.x=1"])
    with pytest.raises(ConfigError, match=r"^thing: no file 'nope' and no shipped thing"):
        _source().read("nope")
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match=r"^thing: cannot parse .*bad\.toml"):
        _source().read(tmp_path / "bad.toml")


def test_an_extends_loop_is_an_error_naming_the_chain(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n[train]\nsteps = 1\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"'extends' loops back: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        _source().read(tmp_path / "a.toml")
    (tmp_path / "self.toml").write_text('extends = "self.toml"\n')
    with pytest.raises(ConfigError, match="loops back"):
        _source().read(tmp_path / "self.toml")
    # a diamond is not a loop: two trees may extend the same base
    (tmp_path / "base.toml").write_text('[train]\nsteps = 5\n')
    (tmp_path / "mid.toml").write_text('extends = "base.toml"\n')
    (tmp_path / "top.toml").write_text('extends = "mid.toml"\n')
    assert _source().read(tmp_path / "top.toml")["train"]["steps"] == 5
