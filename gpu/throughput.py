"""Measured crops/s per size and card, as entries for ``mim_scale/configs/throughput.json`` (what ``mim-scale
plan`` reads; its format is described in the file's "about").

    python gpu/throughput.py --train OUT/train.json --engine OUT/engine.json \
        --source-dir docs/gpu-results/DATE-CARD --out OUT/throughput.json      # on the GPU machine (run_all.sh)
    python gpu/throughput.py --merge OUT/throughput.json --into mim_scale/configs/throughput.json   # afterwards

Entries: ``base`` from ``gpu/train_check.py`` (``run_training`` through ``python -m mim_scale.engine.local``:
the DeepSpeed engine, AdamW step, the recipe's micro-batch; the figure issue 17 counts), and each DeepSpeed
run of ``gpu/engine_check.py`` (``large``: ZeRO-3, ``huge``: ZeRO-3 + CPU offload; the engine's step loop,
not ``run_training``: the ``path`` says so). Failed runs give no entry. ``source`` names the file the figure
will be kept in once the run's folder is copied under ``docs/gpu-results/`` (``--source-dir``).

Merging appends the new entries and drops older ones with the same size, device, path and source (a rerun
replaces its own figure); ``mim-scale plan`` uses the latest entry per size and device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

ABOUT_FALLBACK = "Measured pre-training throughput per device, read by `mim-scale plan` for its projections."


def entries_from_train(train: dict, source: str, date: str) -> list[dict]:
    t = train.get("train") or {}
    if not train.get("card") or not t.get("crops_per_s"):
        return []
    return [{"size": train["config"], "device": train["card"], "crops_per_s": round(t["crops_per_s"], 4),
             "micro_batch": train.get("micro_batch", 1), "precision": "bf16",
             "path": f"run_training via python -m mim_scale.engine.local (DeepSpeed ZeRO-{train.get('zero_stage')}, "
                     f"{train.get('process_group', 'nccl')}, 1 process), median of {t.get('steps_timed')} steps",
             "source": source, "date": date}]


def entries_from_engine(engine: dict, source: str, date: str) -> list[dict]:
    out = []
    for run in engine.get("runs", []):
        if "error" in run or not run.get("crops_per_s") or "deepspeed" not in run.get("mode", ""):
            continue
        out.append({"size": run["size"], "device": engine["device"], "crops_per_s": round(run["crops_per_s"], 4),
                    "micro_batch": run["batch"], "precision": "bf16",
                    "path": f"gpu/engine_check.py: {run['mode']} step loop (not run_training), synthetic crops, "
                            f"peak {run.get('peak_mem_gib', 0):.1f} GiB",
                    "source": source, "date": date})
    return out


def merge(new: list[dict], into: Path) -> dict:
    doc = json.loads(into.read_text()) if into.exists() else {"about": ABOUT_FALLBACK, "measurements": []}
    key = lambda m: (m["size"], m["device"], m["path"], m["source"])  # noqa: E731
    replaced = {key(m) for m in new}
    doc["measurements"] = [m for m in doc["measurements"] if key(m) not in replaced] + new
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", help="gpu/train_check.py's JSON")
    ap.add_argument("--engine", help="gpu/engine_check.py's JSON")
    ap.add_argument("--source-dir", default="docs/gpu-results/(this run)", help="where the run's files will be kept")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    ap.add_argument("--out", help="write {'measurements': [...]} here")
    ap.add_argument("--merge", help="a file written by --out, to merge --into a throughput.json")
    ap.add_argument("--into", help="the throughput.json to update (with --merge)")
    args = ap.parse_args(argv)
    if args.merge:
        if not args.into:
            ap.error("--merge needs --into")
        new = json.loads(Path(args.merge).read_text())["measurements"]
        doc = merge(new, Path(args.into))
        Path(args.into).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{args.into}: {len(new)} measurement(s) merged, {len(doc['measurements'])} in all")
        return 0
    entries: list[dict] = []
    for path, fn, name in ((args.train, entries_from_train, "train.json"), (args.engine, entries_from_engine,
                                                                             "engine.json")):
        if path and Path(path).exists():
            try:
                entries += fn(json.loads(Path(path).read_text()), f"{args.source_dir}/{name}", args.date)
            except (ValueError, KeyError) as exc:
                print(f"{path}: unreadable ({exc}); no entries from it", file=sys.stderr)
    doc = {"about": "entries for mim_scale/configs/throughput.json (merge with gpu/throughput.py --merge)",
           "measurements": entries}
    text = json.dumps(doc, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if entries else 1


if __name__ == "__main__":
    sys.exit(main())
