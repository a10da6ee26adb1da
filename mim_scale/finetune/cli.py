"""``mim-scale finetune`` and ``mim-scale evaluate``."""

from __future__ import annotations

import argparse
import sys

from mim_scale.errors import UserFacingError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune an exported encoder (or scratch) for segmentation or classification",
        description="Fine-tune the hybrid encoder. Segmentation: a Decathlon-style dataset JSON with image/label "
                    "NIfTI pairs. Classification: the same JSON with integer labels, or a CSV image,label[,split].")
    p.add_argument("--task", choices=("segmentation", "classification"), default=None,
                   help="overrides the recipe's task (default: the recipe's, else segmentation)")
    p.add_argument("--data", required=True, help="dataset JSON (Decathlon-style) or CSV (classification)")
    p.add_argument("--init", required=True, help="an exported encoder folder / .safetensors file, or 'scratch'")
    p.add_argument("--out", required=True, help="run folder for checkpoints, metrics and the summary")
    p.add_argument("--recipe", default=None,
                   help="recipe TOML file or shipped name (btcv, msd_spleen, msd_lung, ...); default: built-in "
                        "defaults with the exported encoder's preprocessing")
    p.add_argument("--model", default=None, help="architecture for --init scratch: shipped config name or file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override, e.g. --set train.steps=500 --set preprocessing.spacing=[1.5,1.5,2.0]")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--workers", type=int, default=1,
                   help="Ray Train workers (DDP; train.batch_size is the global batch); 1 = single process")
    p.add_argument("--use-gpu", action="store_true", help="with --workers: one GPU per worker (NCCL)")
    p.add_argument("--address", default="", help="with --workers: Ray cluster address (default: start one locally)")
    p.set_defaults(func=_finetune)

    e = subparsers.add_parser(
        "evaluate", help="JSON report: a fine-tuned run's validation, or pretrained vs scratch at the same budget",
        description="With --run: validate a finished fine-tuning run. With --init (repeatable): fine-tune every "
                    "init plus scratch with the same recipe and step budget, and report the gains over scratch.")
    e.add_argument("--run", default=None, help="a finished `mim-scale finetune` run folder")
    e.add_argument("--protocol", default=None,
                   help="a downstream protocol TOML (arms x seeds: pre-train at equal FLOPs, export, fine-tune, probe; "
                        "see mim_scale/finetune/protocol.py); --out is its JSON report (PNG beside it), --work its "
                        "resumable run folder")
    e.add_argument("--report-only", action="store_true",
                   help="with --protocol: run nothing, report the units finished so far under --work")
    e.add_argument("--init", action="append", default=[], help="exported encoder or 'scratch' (repeatable)")
    e.add_argument("--no-scratch", action="store_true", help="with --init: do not add a scratch baseline")
    e.add_argument("--data", default=None, help="dataset JSON/CSV (default with --run: the run's own)")
    e.add_argument("--task", choices=("segmentation", "classification"), default=None)
    e.add_argument("--recipe", default=None)
    e.add_argument("--model", default=None, help="architecture when every --init is scratch")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    e.add_argument("--work", default=None, help="with --init: folder for the fine-tuning runs (default: next to --out)")
    e.add_argument("--out", required=True, help="the JSON report to write")
    e.set_defaults(func=_evaluate)


def _overrides(args) -> list[str]:
    extra = [f'task="{args.task}"'] if args.task else []
    return extra + list(args.overrides)


def _finetune(args) -> int:
    if args.workers > 1 or args.address:
        from mim_scale.finetune.distributed import finetune_on_workers

        summary = finetune_on_workers(args.data, args.init, args.out, workers=args.workers, use_gpu=args.use_gpu,
                                      address=args.address, recipe=args.recipe, overrides=_overrides(args),
                                      model_config=args.model, resume=args.resume, log=_log)
    else:
        from mim_scale.finetune.train import finetune

        with _Progress("finetune") as progress:
            summary = finetune(args.data, args.init, args.out, recipe=args.recipe, overrides=_overrides(args),
                               model_config=args.model, resume=args.resume, log=progress.log, progress=progress)
    from mim_scale import console

    best = summary.get("best_score")
    console.out(f"\nfine-tuning done: {summary['steps']} steps, {summary['task']}, init {summary['init']}"
                + (f", best {best:.4f}" if isinstance(best, (int, float)) else ""))
    console.out(console.table([("run folder", str(args.out)), ("checkpoint", str(summary["checkpoint"])),
                               ("summary", f"{args.out}/summary.json (metrics.jsonl: every step and validation)"),
                               ("TensorBoard", f"tensorboard --logdir {args.out}")]))
    return 0


class _Progress:
    """The fine-tuning progress line (``mim_scale.console.Progress``): step/total, epoch, loss, mean Dice;
    log lines print above it. One line per run: a new run (its step goes back) gets a new line."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None
        self.fields: dict = {}

    def __call__(self, event: dict) -> None:
        from mim_scale import console

        if self.bar is not None and event["step"] < self.bar.n:
            self.close()
        if self.bar is None:
            self.bar, self.fields = console.Progress(self.desc, event["total"]), {}
        self.fields.update({k: v for k, v in event.items() if v is not None})
        f = self.fields
        text = "  ".join(p for p in (f"epoch {f['epoch']:.1f}" if "epoch" in f else "",
                                     f"loss {f['loss']:.4f}" if "loss" in f else "",
                                     f"Dice {f['dice']:.3f}" if "dice" in f else "") if p)
        self.bar.update(event["step"], text)

    def for_run(self, label: str) -> _Progress:
        """``evaluate --init``: one line per fine-tuning run, named by its label."""
        self.close()
        self.desc = label
        return self

    def log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            _log(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _evaluate(args) -> int:
    from pathlib import Path

    from mim_scale.finetune.evaluate import compare_inits, evaluate_run

    if sum(map(bool, (args.run, args.init, args.protocol))) != 1:
        raise UserFacingError("give either --run RUN_DIR (evaluate a fine-tuned run), --init (compare inits) or "
                              "--protocol FILE (the downstream protocol)")
    if args.protocol:
        from mim_scale.finetune.protocol import run_protocol

        command = "mim-scale evaluate --protocol {} --out {}".format(args.protocol, args.out) + (
            f" --work {args.work}" if args.work else "")
        run_protocol(args.protocol, args.out, work=args.work, command=command, log=_log, report_only=args.report_only)
        return 0
    if args.run:
        evaluate_run(args.run, data=args.data, out=args.out, log=_log)
        return 0
    if not args.data:
        raise UserFacingError("--init needs --data")
    work = Path(args.work) if args.work else Path(args.out).with_suffix("").with_name(Path(args.out).stem + "_runs")
    with _Progress("finetune") as progress:
        compare_inits(args.data, args.init, work, report=args.out, recipe=args.recipe, overrides=_overrides(args),
                      model_config=args.model, with_scratch=not args.no_scratch, log=progress.log,
                      progress=progress.for_run)
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
