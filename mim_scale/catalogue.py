"""``mim-scale models``: which foundation checkpoints exist, and what each was trained on.

    mim-scale models list exports/                       # every export under a folder
    mim-scale models list s3://lab-bucket/exports/       # or under an object-store prefix
    mim-scale models show s3://lab-bucket/exports/base-v1
    mim-scale models show base-v1 --in s3://lab-bucket/exports/

An export is a folder (or prefix) with a ``SHA256SUMS`` (exports and MONAI bundles alike). ``list`` reads
only the small files (``SHA256SUMS``, ``config.json``, an ``evaluate`` report) and the object sizes; it
checks no hashes (the loader does, on every load). Downstream results come from an ``evaluate`` report
shipped in the export (``evaluation.json``, see ``mim-scale export --evaluation``) or sitting beside it
as ``NAME.evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mim_scale.errors import UserFacingError
from mim_scale.export_store import MAX_SUMS_BYTES, SUMS_FILE, ExportEntry, is_remote, join, list_exports, \
    parse_sums, read_json_file, read_small

CONFIG_FILES = ("config.json", "configs/mim_scale_export.json")  # an export's, a MONAI bundle's
EVALUATION_FILE = "evaluation.json"


def _parent(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_remote(location) else str(Path(location).parent)


def describe(entry: ExportEntry) -> dict[str, Any]:
    """One catalogue row (a dict) for an export: what it is, what it saw, how it scored."""
    config: dict[str, Any] = {}
    fmt = "unknown"
    for name in CONFIG_FILES:
        if name in entry.files:
            got = read_json_file(entry.location, name)
            if isinstance(got, dict):
                config, fmt = got, ("mim" if name == "config.json" else "monai-bundle")
                break
    evaluation = None
    if EVALUATION_FILE in entry.files:
        evaluation = read_json_file(entry.location, EVALUATION_FILE)
    if not isinstance(evaluation, dict):
        evaluation = read_json_file(_parent(entry.location), f"{entry.name}.evaluation.json")
    training = config.get("training") or {}
    data = training.get("data") or {}
    pre = config.get("preprocessing") or {}
    return {
        "name": entry.name,
        "location": entry.location,
        "format": fmt,
        "size_bytes": entry.size_bytes,
        "parameters": config.get("parameters"),
        "steps": training.get("step"),
        "crops_seen": training.get("samples_seen"),
        "datasets": data.get("datasets") or {},
        "licenses": {k: v.get("license") for k, v in (data.get("licenses") or {}).items() if isinstance(v, dict)},
        "preprocessing": ({"orientation": pre.get("orientation"), "spacing_mm": pre.get("spacing_mm"),
                           "hu_window": [pre.get("hu_min"), pre.get("hu_max")]} if pre else {}),
        "downstream": _downstream(evaluation) if isinstance(evaluation, dict) else {},
        "exported_at": config.get("exported_at"),
    }


def _downstream(report: dict[str, Any]) -> dict[str, Any]:
    """{"task": ..., metric: value, "vs_scratch": {metric: delta}} of the report's pretrained run."""
    runs = report.get("runs") if isinstance(report.get("runs"), dict) else {}
    pre = [(k, r) for k, r in runs.items() if isinstance(r, dict) and r.get("pretrained")]
    if not pre:
        return {}
    label, run = pre[0]
    val = run.get("validation") or {}
    out: dict[str, Any] = {"task": report.get("task")}
    for metric in ("mean_dice", "accuracy", "auc"):
        if isinstance(val.get(metric), (int, float)):
            out[metric] = float(val[metric])
    delta = (report.get("delta_vs_scratch") or {}).get(label) or {}
    deltas = {m: float(v) for m, v in delta.items() if isinstance(v, (int, float))}
    if deltas:
        out["vs_scratch"] = deltas
    return out


def catalogue(location: str) -> list[dict[str, Any]]:
    return [describe(e) for e in list_exports(location)]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cell(row: dict[str, Any], key: str) -> str:
    v = row[key]
    if key == "size_bytes":
        return _size(v)
    if key == "parameters":
        return f"{v / 1e6:.2f}M" if isinstance(v, int) else "?"
    if key == "datasets":
        return ", ".join(f"{k}:{n}" for k, n in sorted(v.items())) or "?"
    if key == "preprocessing":
        if not v:
            return "?"
        lo, hi = v["hu_window"]
        return f"{v['orientation']} {v['spacing_mm']}mm HU[{lo:g},{hi:g}]"
    if key == "downstream":
        if not v:
            return "-"
        parts = [f"{m} {v[m]:.3f}" for m in ("mean_dice", "accuracy", "auc") if m in v]
        parts += [f"({m} {d:+.3f} vs scratch)" for m, d in (v.get("vs_scratch") or {}).items()
                  if m in ("mean_dice", "accuracy", "auc")]
        return " ".join(parts) or "-"
    return "?" if v is None else str(v)


COLUMNS = (("name", "NAME"), ("format", "FORMAT"), ("size_bytes", "SIZE"), ("parameters", "PARAMS"),
           ("steps", "STEPS"), ("crops_seen", "CROPS"), ("datasets", "DATA SETS (volumes)"),
           ("preprocessing", "PREPROCESSING"), ("downstream", "DOWNSTREAM"), ("exported_at", "DATE"))


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title in COLUMNS]] + [[_cell(r, key) for key, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells)


def find(name: str, location: str | None) -> str:
    """``name`` as a location (a folder or an s3:// URI holding an export), else the export of that name
    under ``location``."""
    if is_remote(name) or Path(name).is_dir():
        return name
    if not location:
        raise UserFacingError(f"{name}: not a folder or s3:// URI; give --in LOCATION to look it up by name")
    matches = [e.location for e in list_exports(location) if e.name == name]
    if not matches:
        raise UserFacingError(f"{location}: no export named {name!r} (see `mim-scale models list {location}`)")
    if len(matches) > 1:
        raise UserFacingError(f"{location}: {len(matches)} exports named {name!r}: {', '.join(matches)}")
    return matches[0]


def card(location: str) -> str:
    """The export's model card text (README.md; a bundle's docs/README.md), if its SHA256SUMS lists it.
    Only the card is read (bounded); the loader verifies the weights."""
    sums_bytes = read_small(location, SUMS_FILE, MAX_SUMS_BYTES)
    if sums_bytes is None:
        raise UserFacingError(f"{location}: no {SUMS_FILE}: not an export, or an incomplete one")
    sums = parse_sums(sums_bytes, join(location, SUMS_FILE))
    for name in ("README.md", "docs/README.md"):
        if name in sums:
            body = read_small(location, name)
            if body is None:
                raise UserFacingError(f"{join(location, name)}: listed in {SUMS_FILE} but missing or too large")
            return body.decode("utf-8", errors="replace")
    raise UserFacingError(f"{location}: no model card (README.md) in this export")


def _list(args: argparse.Namespace) -> int:
    rows = catalogue(args.location)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print(f"{args.location}: no exports (folders or prefixes holding SHA256SUMS)", file=sys.stderr)
    else:
        print(format_table(rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    location = find(args.name, args.location)
    print(card(location), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list foundation checkpoints (a folder or s3:// prefix) and show their cards",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    lp = msub.add_parser("list", help="one row per export under LOCATION")
    lp.add_argument("location", metavar="LOCATION", help="a folder or an s3://bucket/prefix")
    lp.add_argument("--json", action="store_true", help="print the rows as JSON")
    lp.set_defaults(func=_list)
    sp = msub.add_parser("show", help="print an export's model card")
    sp.add_argument("name", metavar="NAME", help="an export folder, an s3:// URI, or a name under --in")
    sp.add_argument("--in", dest="location", default=None, metavar="LOCATION", help="where to look NAME up")
    sp.set_defaults(func=_show)
