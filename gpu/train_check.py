"""The real training path on one GPU without Ray: DeepSpeed engine under NCCL, steps, checkpoint, resume, export.

Run by ``gpu/run_all.sh`` first (it is the riskiest step: the engine has never completed a step on a GPU).
Ray stays off the GPU machine (no Ray wheel fits the device tool's carry limit, and one GPU needs no cluster):
the project's non-Ray entry point ``python -m mim_scale.engine.local`` starts the worker process (RANK /
WORLD_SIZE / MASTER_ADDR as under ``torchrun``), which calls :func:`mim_scale.engine.loop.run_training`
exactly as a Ray worker does; with ``launch.use_gpu=true`` the process group is NCCL.

    python gpu/train_check.py --json train.json                      # base, ZeRO-2, bf16, on the GPU
    python gpu/train_check.py --device cpu --config tiny --json t.json   # CPU smoke (gloo), tests/gpu

Sequence, each part recorded as it finishes (a failure keeps what came before):

1. train ``--steps`` optimizer steps with a checkpoint every ``--checkpoint-every`` steps (the recipe's
   micro-batch, gradient accumulation 1 so a step is one crop per GPU: ``train.global_batch_crops`` = micro-batch);
2. resume: the same run folder to ``--steps + --more-steps``; checks it resumed at the last checkpoint's step;
3. export: ``mim-scale export`` of the last checkpoint, then loads the exported encoder strictly.

crops/s is the engine's own step time (``step_seconds`` in the per-step log, median over steps after the first
two, which include compilation and allocator growth), through ``run_training``: the figure issue 17 asks for.
Shards: ``--shards`` (e.g. carried ``.gpu-shards/``), else built here from ``--ct`` (a NIfTI) at 3 mm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build_shards_from_ct(ct: Path, out: Path) -> Path:
    """One-volume shards of ``ct`` at 3 mm (speed does not depend on the content; small enough to carry)."""
    from mim_scale.shards.builder import build_shards

    build_shards([str(ct)], out, spacing=3.0, target_shard_bytes=1, workers=0, progress=False)
    return out


def overrides(args: argparse.Namespace, steps: int) -> list[str]:
    gpu = args.device == "cuda"
    return [f"data.shards={args.shards}", f"train.steps={steps}", f"train.zero_stage={args.zero}",
            f"train.micro_batch={args.micro_batch}", f"train.global_batch_crops={args.micro_batch}",
            f"train.checkpoint_every={args.checkpoint_every}", "train.validate_every=0", "metrics.enabled=false",
            f"launch.use_gpu={'true' if gpu else 'false'}", "data.num_workers=1", *args.set]


def _run(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with its output in a file, not a pipe: the engine's spawned helpers can outlive it holding
    inherited pipe ends, and reading a pipe to its end would then wait for them."""
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return rc, log_path.read_text(errors="replace")


def run_local(args: argparse.Namespace, run_dir: Path, steps: int, log) -> dict:
    """One ``python -m mim_scale.engine.local --workers 1`` call; returns rank 0's result and step records."""
    cmd = [sys.executable, "-m", "mim_scale.engine.local", "--config", args.config, "--workers", "1",
           "--run-dir", str(run_dir)]
    for o in overrides(args, steps):
        cmd += ["--set", o]
    t0 = time.perf_counter()
    rc, out = _run(cmd, run_dir.parent / f"{run_dir.name}-{steps}.log", args.timeout)
    wall = time.perf_counter() - t0
    log(f"$ {' '.join(cmd)}\n(exit {rc}, {wall:.1f} s)\n{out[-6000:]}")
    if rc != 0:
        raise RuntimeError(f"engine.local exited {rc}: {out.strip().splitlines()[-1:]}")
    result = json.loads((run_dir / "results" / "rank-0.json").read_text())
    steps_log = [json.loads(line) for line in (run_dir / "results" / "rank-0-steps.jsonl").read_text().splitlines()
                 if line.strip()]
    return {"wall_s": round(wall, 1), "result": result, "steps": steps_log}


def crops_per_s(steps: list[dict], crops_per_step: int) -> dict:
    """Median step time over the steps after the first two (compilation, allocator growth) -> crops/s."""
    times = [s["step_seconds"] for s in steps if s.get("step_seconds")]
    steady = times[2:] or times
    if not steady:
        return {"crops_per_s": None, "step_s": None, "steps_timed": 0}
    med = statistics.median(steady)
    return {"crops_per_s": crops_per_step / med, "step_s": med, "steps_timed": len(steady)}


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def export_and_load(run_dir: Path, out: Path, log) -> dict:
    cmd = [sys.executable, "-m", "mim_scale.cli", "export", str(run_dir), "--out", str(out)]
    rc, text = _run(cmd, out.parent / "export.log", 300.0)
    log(f"$ {' '.join(cmd)}\n(exit {rc})\n{text[-4000:]}")
    if rc != 0:
        raise RuntimeError(f"export exited {rc}: {text.strip().splitlines()[-1:]}")
    try:  # the loading API may move below the engine (issue 21: mim_scale.model.io)
        from mim_scale.model.io import load_encoder
    except ImportError:
        from mim_scale.export import load_encoder
    encoder, _ = load_encoder(out, strict=True)
    return {"files": sorted(p.name for p in out.iterdir()),
            "encoder_params_loaded": sum(p.numel() for p in encoder.parameters())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--config", default="base")
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=1, help="crops per step (the recipe's micro-batch: 1)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--checkpoint-every", type=int, default=3)
    ap.add_argument("--more-steps", type=int, default=2, help="steps trained after the resume")
    ap.add_argument("--shards", default=None, help="shard folder (manifest inside); else built from --ct")
    ap.add_argument("--ct", default=None, help="NIfTI CT to build shards from when --shards is absent")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per engine.local call")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="train_check_"))
    work.mkdir(parents=True, exist_ok=True)
    rec: dict = {"config": args.config, "zero_stage": args.zero, "micro_batch": args.micro_batch,
                 "device": args.device, "entry_point": "python -m mim_scale.engine.local --workers 1 (no Ray)",
                 "ok": False}
    if args.device == "cuda":
        import torch

        rec["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        rec["process_group"] = "nccl"
    else:
        rec["card"], rec["process_group"] = "cpu", "gloo"

    def log(msg: str) -> None:
        print(msg, flush=True)

    def dump() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(rec, indent=1, default=str))

    try:
        if args.shards is None:
            if not args.ct:
                raise ValueError("give --shards or --ct (a NIfTI CT to build shards from)")
            t0 = time.perf_counter()
            args.shards = str(build_shards_from_ct(Path(args.ct), work / "shards"))
            rec["shards_built_s"] = round(time.perf_counter() - t0, 1)
        rec["shards"] = args.shards
        run_dir = work / "run"
        first = run_local(args, run_dir, args.steps, log)
        rec["train"] = {"wall_s": first["wall_s"], "steps": first["steps"], "checkpoints": checkpoints(run_dir),
                        **crops_per_s(first["steps"], args.micro_batch),
                        "last": {k: first["result"].get(k) for k in ("step", "total", "samples_seen", "mfu",
                                                                      "peak_memory_gib", "max_memory_gib")}}
        dump()
        last_ckpt = max((int(n.split("_")[1]) for n in rec["train"]["checkpoints"]), default=None)
        if last_ckpt is None:
            raise RuntimeError(f"no checkpoint under {run_dir / 'checkpoints'} after {args.steps} steps")
        second = run_local(args, run_dir, args.steps + args.more_steps, log)
        resumed_steps = [s["step"] for s in second["steps"][len(first["steps"]):]]
        rec["resume"] = {"from_step": last_ckpt, "steps_after_resume": resumed_steps, "wall_s": second["wall_s"],
                         "ok": bool(resumed_steps) and resumed_steps[0] == last_ckpt + 1
                         and resumed_steps[-1] == args.steps + args.more_steps}
        dump()
        if not rec["resume"]["ok"]:
            raise RuntimeError(f"resume did not continue from step {last_ckpt}: steps {resumed_steps}")
        rec["export"] = export_and_load(run_dir, work / "export", log)
        rec["ok"] = True
    except Exception as exc:  # noqa: BLE001 - record the failure with what was measured before it
        rec["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {rec['error']}")
    dump()
    summary = {k: rec.get(k) for k in ("ok", "card", "config", "zero_stage", "error")}
    if "train" in rec:
        summary.update(crops_per_s=rec["train"]["crops_per_s"], step_s=rec["train"]["step_s"])
    log(json.dumps(summary))
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
