"""Volumes set aside for validation: a held-out shard set that training never reads.

    mim-scale shards build ct=/data/ct --out /data/shards --holdout 0.05
    mim-scale shards build ct=/data/ct --out /data/shards --holdout-list heldout.txt

builds ``/data/shards`` (training) and ``/data/shards-holdout`` (its own manifest), both keyed with the same
de-identified salt, so a volume's sample key is the same in either and the split can be checked by key. Point
``data.validation_shards`` at the second: validation losses are then labelled held-out.

The split is by *group*, never by crop: a group is every volume of one patient where the layout says so (the
first folder under the input root, as in TCIA's ``PATIENT/STUDY/SERIES`` trees and TotalSegmentator's
``sNNNN/ct.nii.gz``), else one volume. ``--holdout F`` takes the groups whose salted hash falls below F (stable:
adding volumes later does not move old ones across the split); ``--holdout-list`` names groups, sources or
sample keys, one per line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from mim_scale.errors import UserFacingError
from mim_scale.shards.inputs import InputSpec, parse_inputs

HOLDOUT_SUFFIX = "-holdout"


def holdout_dir(out: Path) -> Path:
    """Where the held-out shards of a build into ``out`` go (beside it, never inside the shareable folder)."""
    return out.with_name(out.name + HOLDOUT_SUFFIX)


def group_of(source: str, spec_root: Path) -> str:
    """The patient-level group of a volume: the first folder below the input root when the volume sits deeper
    than one level (``ROOT/PATIENT/...``), else the volume's own path."""
    rel = os.path.relpath(source, spec_root)
    parts = Path(rel).parts
    return str(Path(spec_root, parts[0])) if len(parts) > 1 and not rel.startswith("..") else source


def choose_holdout(items: list[Any], roots: dict[str, Path], fraction: float, listed: set[str], salt: bytes) -> set[str]:
    """Sample keys of the held-out volumes: every volume of a group whose salted hash < ``fraction``, or whose
    group, source or key is ``listed``."""
    held: set[str] = set()
    for it in items:
        group = group_of(it.source, roots[it.dataset])
        draw = int.from_bytes(hashlib.sha256(salt + group.encode()).digest()[:8], "big") / 2**64
        if draw < fraction or {group, it.source, it.key} & listed:
            held.add(it.key)
    return held


def read_list(path: Path) -> set[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UserFacingError(f"{path}: cannot read the hold-out list ({exc})") from exc
    return {str(Path(x).resolve()) if os.sep in x else x.lower() for x in (ln.split("#")[0].strip() for ln in lines) if x}


def build_with_holdout(inputs: list[InputSpec | str | Path], out: str | Path, *, fraction: float = 0.0,
                       holdout_list: Path | set[str] | None = None, private_dir: str | Path | None = None,
                       exclude: set[str] | str | Path | None = None, dataset: str = "default", **build_kwargs):
    """Build the training shards into ``out`` and the held-out ones into :func:`holdout_dir` (``out``-holdout).

    ``holdout_list``: a file of groups / volume paths / sample keys (one per line), or such a set. Returns
    (training report, held-out report). Raises UserFacingError when nothing or everything would be held out. ``build_kwargs`` go to :func:`mim_scale.shards.builder.build_shards` for both builds.
    """
    from mim_scale.shards.builder import _load_salt, build_shards, plan_inputs, read_exclude

    if not (0.0 <= fraction < 1.0):
        raise UserFacingError(f"--holdout {fraction}: the held-out fraction must be in [0, 1)")
    out = Path(out).resolve()
    private = Path(private_dir).resolve() if private_dir is not None else out.with_name(out.name + ".private")
    held_out, held_private = holdout_dir(out), holdout_dir(out).with_name(holdout_dir(out).name + ".private")
    specs = parse_inputs(list(inputs), default_dataset=dataset)
    private.mkdir(parents=True, exist_ok=True)
    os.chmod(private, 0o700)
    salt = _load_salt(private)
    items, _ = plan_inputs(specs, salt)
    roots = {spec.dataset: spec.path.resolve() for spec in specs}
    if isinstance(holdout_list, (str, Path)):
        listed = read_list(Path(holdout_list))
    else:  # paths or sample keys given directly
        listed = {str(Path(x).resolve()) if os.sep in x else x.lower() for x in holdout_list or ()}
    held = choose_holdout(items, roots, fraction, listed, salt)
    if not held:
        raise UserFacingError(f"no volume held out of {len(items)} (--holdout {fraction:g}"
                              f"{', --holdout-list ' + str(holdout_list) if holdout_list else ''}): raise the fraction "
                              "or list the volumes")
    if len(held) == len(items):
        raise UserFacingError(f"every one of the {len(items)} volumes would be held out: nothing left to train on")
    excl = read_exclude(Path(exclude)) if isinstance(exclude, (str, Path)) else {e.lower() for e in exclude or ()}
    train_keys = {it.key for it in items} - held
    train = build_shards(inputs, out, private_dir=private, exclude=excl | held, dataset=dataset, **build_kwargs)
    held_private.mkdir(parents=True, exist_ok=True)
    os.chmod(held_private, 0o700)
    shutil.copyfile(private / "salt.txt", held_private / "salt.txt")  # the same keys in both sets
    holdout = build_shards(inputs, held_out, private_dir=held_private, exclude=excl | train_keys, dataset=dataset,
                           **build_kwargs)
    return train, holdout
