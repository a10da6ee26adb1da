"""Build inputs: a path (DICOM tree, NIfTI file, or a folder of NIfTI files) tagged with a dataset name.

Spellings accepted by :func:`parse_inputs`:

* ``PATH`` -> dataset ``default``;
* ``NAME=PATH`` -> dataset ``NAME`` (``NAME`` matches ``[A-Za-z0-9][A-Za-z0-9_.-]*``);
* a ``.csv`` / ``.txt`` / ``.list`` file: one input per line, either ``PATH`` or ``NAME,PATH``
  (an optional header line ``dataset,path``; ``#`` starts a comment; relative paths are relative to
  the list file's folder).

Dataset names are written to the shareable set; they are chosen by the user, never derived from a
path (folder names of hospital exports are often patient names).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from mim_scale.errors import UserFacingError

DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LIST_SUFFIXES = (".csv", ".txt", ".list")


@dataclass(frozen=True)
class InputSpec:
    """One input root: ``path`` (folder or file) and the ``dataset`` name its volumes are counted under."""

    path: Path
    dataset: str = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not DATASET_RE.match(self.dataset):
            raise UserFacingError(f"dataset name {self.dataset!r}: use letters, digits, '_', '-', '.' (max 64)")


def _check(spec: InputSpec) -> InputSpec:
    if not spec.path.exists():
        raise UserFacingError(f"{spec.path}: input does not exist")
    return spec


def parse_inputs(items: list[InputSpec | str | Path], default_dataset: str = "default") -> list[InputSpec]:
    """Normalise the ``inputs`` argument of ``build_shards`` into checked InputSpecs (see module doc).

    ``default_dataset`` names the inputs given without ``NAME=`` (and list lines without a name)."""
    out: list[InputSpec] = []
    for item in items:
        if isinstance(item, InputSpec):
            out.append(_check(item))
            continue
        text = str(item)
        path = Path(text)
        if not path.exists() and "=" in text:
            name, _, rest = text.partition("=")
            if DATASET_RE.match(name):
                out.extend(_expand(InputSpec(Path(rest), name)))
                continue
        out.extend(_expand(InputSpec(path, default_dataset)))
    if not out:
        raise UserFacingError("no inputs given")
    return out


def _expand(spec: InputSpec) -> list[InputSpec]:
    spec = _check(spec)
    if spec.path.is_file() and spec.path.suffix.lower() in LIST_SUFFIXES:
        return read_input_list(spec.path, default_dataset=spec.dataset)
    return [spec]


def read_input_list(path: Path, default_dataset: str = "default") -> list[InputSpec]:
    """Parse a CSV / list file of inputs (see module doc)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserFacingError(f"{path}: cannot read input list ({exc})") from exc
    out = []
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#"):
            continue
        if lineno == 1 and [c.lower() for c in row[:2]] == ["dataset", "path"]:
            continue
        if len(row) == 1:
            name, p = default_dataset, row[0]
        elif len(row) == 2:
            name, p = row
        else:
            raise UserFacingError(f"{path}:{lineno}: expected 'PATH' or 'DATASET,PATH', got {len(row)} columns")
        target = Path(p)
        if not target.is_absolute():
            target = path.parent / target
        try:
            spec = InputSpec(target, name)
        except UserFacingError as exc:
            raise UserFacingError(f"{path}:{lineno}: {exc}") from exc
        if not target.exists():
            raise UserFacingError(f"{path}:{lineno}: {target} does not exist")
        out.append(spec)
    if not out:
        raise UserFacingError(f"{path}: input list has no entries")
    return out
