"""``mim-scale report RUN``: a run's summary table, and its pictures regenerated from its last checkpoint.

    mim-scale report quickstart-out/runs/quickstart

Prints steps, samples seen, restarts and the last losses per level, with the loss trend; rewrites
``RUN/pictures/loss_curves.png`` from ``history.jsonl`` and ``RUN/pictures/reconstruction_report.png`` from
the latest checkpoint on crops of the run's own shards (levels 1-3: input, masked input, prediction).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mim_scale.errors import UserFacingError


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of a run, the last record of each step kept (a restart repeats steps). Read to the
    last complete line (a driver killed mid-append leaves a torn one); records without a step are skipped."""
    from mim_scale.fileutil import read_jsonl
    from mim_scale.rundir import HISTORY_FILE

    by_step: dict[int, dict] = {}
    for record in read_jsonl(Path(run_dir) / HISTORY_FILE):
        if isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def summary_rows(history: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(metric, first, last, change) rows for the losses of a run: training losses from the first and last
    steps, validation losses (``val_*``, on the run's fixed set) from the first and last validated steps."""
    if not history:
        return []
    rows = _rows(history[0], history[-1], [k for k in history[-1] if k.startswith(("rec_", "align_", "total", "z_std"))])
    validated = validated_records(history)
    if validated:
        rows += _rows(validated[0], validated[-1], [k for k in validated[-1] if k.startswith("val_")])
    return rows


def validated_records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the steps the run validated at (they carry ``val_*`` losses)."""
    return [h for h in history if "val_total" in h]


def _rows(first: dict[str, Any], last: dict[str, Any], keys: list[str]) -> list[tuple[str, str, str, str]]:
    rows = []
    for key in sorted(keys):
        a, b = first.get(key), last.get(key)
        change = f"{(b - a) / a * 100:+.1f}%" if a not in (None, 0) and b is not None else ""
        rows.append((key, f"{a:.4f}" if a is not None else "-", f"{b:.4f}" if b is not None else "-", change))
    return rows


def reconstruction_from_checkpoint(run_dir: Path, out_png: Path, crops: int = 2) -> Path:
    import torch

    from mim_scale.config import from_dict
    from mim_scale.data.stream import make_loader, manifest_shards
    from mim_scale.data.window import hu_window
    from mim_scale.engine import checkpoint as ckpt
    from mim_scale.model import build_model
    from mim_scale.pictures import method_reconstruction, save_method_png

    ckpt_dir = ckpt.latest_checkpoint(run_dir)
    state = ckpt.TrainState.read(ckpt_dir)
    cfg = from_dict(state.config).replace({"data.num_workers": 0})
    model = build_model(cfg)
    model.load_state_dict(ckpt.consolidated_state_dict(ckpt_dir), strict=True)
    model.eval()
    loader = make_loader(cfg.data, manifest_shards(cfg.data), rank=0, world_size=1, batch_size=crops, pin_memory=False)
    batch = next(iter(loader))
    with torch.no_grad():  # the chain of views with the most tissue, as the run's own pictures
        picture = method_reconstruction(model, hu_window(batch["crop"], cfg.data.hu_min, cfg.data.hu_max),
                                        seed=cfg.train.seed)
    save_method_png(picture, out_png, title=f"{Path(run_dir).name} step {state.step}")
    return out_png


def report(run_dir: Path, *, pictures: bool = True) -> dict[str, Any]:
    from mim_scale.engine import checkpoint as ckpt
    from mim_scale.config import from_dict
    from mim_scale.pictures import save_loss_curves_png, zero_losses_for_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserFacingError(f"{run_dir}: no such run folder")
    history = read_history(run_dir)
    checkpoints = ckpt.find_checkpoints(run_dir)
    state = ckpt.TrainState.read(checkpoints[-1]) if checkpoints else None
    print(f"run {run_dir.name}  ({run_dir})")
    if state is not None:
        print(f"  step {state.step}   samples seen {state.samples_seen}   tokens seen {state.tokens_seen}   "
              f"restarts {state.restarts}   workers {state.world_size}   global batch {state.global_batch}")
        print(f"  last checkpoint {checkpoints[-1]}  ({len(checkpoints)} kept)")
    else:
        print("  no checkpoint yet")
    rows = summary_rows(history)
    if rows:
        validated = validated_records(history)
        if validated:
            kind = validated[-1].get("validation_set", "seen")
            what = "held-out volumes, never trained on" if kind == "held-out" else "crops of training volumes (seen)"
            print(f"  validation (val_*, fixed set of {what}) at steps {', '.join(str(h['step']) for h in validated)}")
        print(f"  {'metric':12s} {'first':>10s} {'last':>10s} {'change':>9s}")
        for row in rows:
            print(f"  {row[0]:12s} {row[1]:>10s} {row[2]:>10s} {row[3]:>9s}")
    out: dict[str, Any] = {"history": len(history), "checkpoints": [str(p) for p in checkpoints]}
    if pictures:
        pic_dir = run_dir / "pictures"
        pic_dir.mkdir(exist_ok=True)
        if history:
            zeros = zero_losses_for_run(from_dict(state.config), run_dir) if state is not None else None
            out["loss_curves"] = save_loss_curves_png(history, pic_dir / "loss_curves.png", zeros=zeros)
            print(f"  loss curves: {out['loss_curves']}")
        if checkpoints:
            out["reconstruction"] = reconstruction_from_checkpoint(run_dir, pic_dir / "reconstruction_report.png")
            print(f"  reconstructions: {out['reconstruction']}")
    return out


def _run(args: argparse.Namespace) -> int:
    report(Path(args.run), pictures=not args.no_pictures)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="summary table of a run, and its pictures regenerated",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="the run folder (STORAGE/NAME)")
    p.add_argument("--no-pictures", action="store_true", help="print the table only")
    p.set_defaults(func=_run)
