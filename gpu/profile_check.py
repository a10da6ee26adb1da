"""Where a base step's GPU time goes: a per-kernel profile through run_training, the depthwise conv's kernels,
and the conv stages eager vs torch.compile at batch 1/2/4/8 (bf16).

Run by ``gpu/run_all.sh`` after the engine check. Ray stays off the GPU machine: the profile runs
:func:`mim_scale.engine.loop.run_training` in this process as rank 0 of a one-process NCCL group (the
environment ``torchrun`` would set), with the DeepSpeed engine, the AdamW step and the config's micro-batch.

    python gpu/profile_check.py --shards DIR --json profile.json          # on the GPU (base)
    python gpu/profile_check.py --device cpu --config tiny --shards DIR --small --json p.json   # CPU smoke

Parts (each recorded as it finishes, so a later failure keeps the earlier figures):

- ``step_profile``: torch.profiler over one optimizer step (the third; the first two warm up) through
  ``run_training``: the top CUDA kernels by device time, their share of the step, and the kernels whose names
  say depthwise / cuDNN / conv (PyTorch's native ``conv_depthwise3d`` or cuDNN's);
- ``depthwise_kernels``: the model's own ``DepthwiseConv3d`` on the channels-last view the conv blocks pass,
  at base's conv-stage shapes: which kernels run the forward, the input gradient (dgrad) and the weight
  gradient (wgrad), each profiled alone;
- ``conv_stages``: the encoder's conv stages (``conv_features`` on a step's real views and masks: 21 views per
  crop) forward + backward, eager and ``torch.compile`` (inductor; the ``eager`` backend on CPU), per batch of
  crops; compiles that would pass ``--budget-s`` are skipped and say so.

Memory traffic per kernel needs Nsight Compute, which the lent machine does not carry: not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from depthwise_check import best_ms  # a sibling script: gpu/ is sys.path[0] when run as python gpu/<name>.py

CONV_PATTERN = re.compile(r"depthwise|cudnn|conv|dgrad|wgrad|xmma|implicit", re.IGNORECASE)
BASE_DW_SHAPES = ((21, 48, 48), (21, 96, 24))  # (views, channels, side) of base's conv stages
SMALL_DW_SHAPES = ((2, 4, 6),)


def _device_time_us(evt) -> float:
    return float(getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0) or 0.0)


def _self_time_us(evt, device: str) -> float:
    if device == "cuda":
        return float(getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0) or 0.0)
    return float(evt.self_cpu_time_total)


def kernel_table(prof, device: str, top: int) -> dict:
    """Top entries by self time: CUDA kernels on a GPU (device-side events), aten ops on CPU."""
    # on a GPU only kernels (and memcpys) have self device time; CPU-side ops have none of their own
    events = [e for e in prof.key_averages() if _self_time_us(e, device) > 0 and not e.key.startswith("ProfilerStep")]
    total = sum(_self_time_us(e, device) for e in events) or 1.0
    rows = sorted(events, key=lambda e: -_self_time_us(e, device))
    table = [{"name": e.key[:160], "ms": round(_self_time_us(e, device) / 1e3, 3), "calls": e.count,
              "share": round(_self_time_us(e, device) / total, 4)} for e in rows[:top]]
    conv = [{"name": e.key[:160], "ms": round(_self_time_us(e, device) / 1e3, 3), "calls": e.count}
            for e in rows if CONV_PATTERN.search(e.key)]
    return {"total_ms": round(total / 1e3, 3), "top": table, "conv_kernels": conv[:20]}


def _activities(device: str):
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]


def step_profile(args, top: int) -> dict:
    """One optimizer step of ``run_training`` under torch.profiler (the third step; two warm up)."""
    from torch.profiler import profile, schedule

    from mim_scale.config import load_config
    from mim_scale.engine.loop import Reporter, run_training

    gpu = args.device == "cuda"
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
    if gpu:  # DeepSpeed's op builder cannot parse arch names such as "9.0a"
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    cfg = load_config(args.config, [f"data.shards={args.shards}", "train.steps=4", "train.checkpoint_every=0",
                                    "train.validate_every=0", "metrics.enabled=false", "data.num_workers=1",
                                    f"train.global_batch_crops={args.micro_batch}",
                                    f"train.micro_batch={args.micro_batch}",
                                    f"launch.use_gpu={'true' if gpu else 'false'}", *args.set])
    run_dir = Path(tempfile.mkdtemp(prefix="profile_run_"))
    prof = profile(activities=_activities(args.device), schedule=schedule(wait=1, warmup=1, active=1, repeat=1))
    seconds: list[float] = []

    def on_step(metrics: dict) -> None:
        seconds.append(metrics.get("step_seconds"))
        prof.step()

    with prof:
        last = run_training(cfg, run_dir=run_dir, reporter=Reporter(run_dir, keep_last=1), on_step=on_step)
    out = kernel_table(prof, args.device, top)
    out.update(config=args.config, micro_batch=args.micro_batch, step_seconds=seconds, profiled_step=3,
               mfu=last.get("mfu"), path="run_training (DeepSpeed engine, AdamW step), one process")
    return out


def depthwise_kernels(device: torch.device, shapes, top: int = 4) -> list[dict]:
    """Kernels of the model's depthwise conv on the conv blocks' channels-last view: fwd, dgrad, wgrad."""
    from torch.profiler import profile

    from mim_scale.model.layers import DepthwiseConv3d

    rows = []
    for views, ch, side in shapes:
        conv = DepthwiseConv3d(ch, 5).to(device)
        h = torch.randn(views, side, side, side, ch, device=device, dtype=torch.bfloat16)  # (N, D, H, W, C)
        gout = torch.randn(views, ch, side, side, side, device=device, dtype=torch.bfloat16)
        passes = {}
        for name, need_x, need_w in (("forward", False, False), ("dgrad", True, False), ("wgrad", False, True)):
            x = h.detach().clone().requires_grad_(need_x)
            conv.weight.requires_grad_(need_w)
            conv.bias.requires_grad_(False)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = conv(x.permute(0, 4, 1, 2, 3))  # the view ConvBlock passes: channels-last-3d strides
                if name != "forward":
                    y.backward(gout.to(y.dtype).contiguous(memory_format=torch.channels_last_3d))
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=_activities(device.type)) as prof:  # the second call: no first-call costs
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    y = conv(x.permute(0, 4, 1, 2, 3))
                    if name != "forward":
                        y.backward(gout.to(y.dtype).contiguous(memory_format=torch.channels_last_3d))
                if device.type == "cuda":
                    torch.cuda.synchronize()
            passes[name] = kernel_table(prof, device.type, top)["top"]
        conv.weight.requires_grad_(True)
        conv.bias.requires_grad_(True)
        rows.append({"views": views, "channels": ch, "side": side, "kernel": 5, "passes": passes})
    return rows


def conv_stage_inputs(model, cfg, batch: int, device: torch.device):
    """A step's real encoder inputs: every level's views and token keep masks, concatenated (21 per crop)."""
    from mim_scale.model.encoder import token_keep_mask

    g = torch.Generator(device="cpu").manual_seed(batch)
    side = cfg.data.crop_size
    crops = torch.rand((batch, cfg.model.in_channels, side, side, side), generator=g).to(device)
    levels = model.make_views(crops, torch.Generator(device=device).manual_seed(0))
    x = torch.cat([lv.x for lv in levels])
    keep = torch.cat([token_keep_mask(lv.ids_keep, None, cfg.model.grid**3) for lv in levels])
    return x, keep


def conv_stages(args, device: torch.device, batches, reps: int, deadline: float) -> list[dict]:
    """Encoder conv stages forward + backward, eager and compiled, per batch of crops (bf16 autocast)."""
    from mim_scale.config import load_config
    from mim_scale.model import build_model

    cfg = load_config(args.config, [s for s in args.set if s.startswith("model.") or s.startswith("data.crop")])
    model = build_model(cfg).to(device)
    enc = model.encoder
    compiled = torch.compile(enc.conv_features, backend="inductor" if device.type == "cuda" else "eager")

    def timed(fn, x, keep) -> float:
        def once():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                feats = fn(x, keep)
            sum(f.float().square().mean() for f in feats).backward()
            enc.zero_grad(set_to_none=True)
        return best_ms(once, device, reps)

    rows = []
    for batch in batches:
        x, keep = conv_stage_inputs(model, cfg, batch, device)
        row = {"batch_crops": batch, "views": int(x.shape[0]), "eager_ms": timed(enc.conv_features, x, keep)}
        if device.type == "cuda":
            row["eager_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:  # compiled after every eager figure is in: compiles are the slow, skippable part
        if time.monotonic() > deadline:
            row["compile"] = "skipped: time budget spent"
            continue
        x, keep = conv_stage_inputs(model, cfg, row["batch_crops"], device)
        t0 = time.perf_counter()
        row["compile_ms"] = timed(compiled, x, keep)
        row["compile_wall_s"] = round(time.perf_counter() - t0, 1)
        row["speedup_compile_vs_eager"] = row["eager_ms"] / row["compile_ms"]
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--config", default="base")
    ap.add_argument("--shards", required=True, help="shard folder for the run_training profile")
    ap.add_argument("--micro-batch", type=int, default=1, help="crops per step (the recipe's micro-batch: 1)")
    ap.add_argument("--batches", default="1,2,4,8", help="crops per conv-stage measurement")
    ap.add_argument("--small", action="store_true", help="tiny depthwise shapes (smoke run)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--budget-s", type=float, default=150.0, help="no new torch.compile after this many seconds")
    ap.add_argument("--parts", default="step,depthwise,stages")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_check: no CUDA device", file=sys.stderr)
        return 2
    start = time.monotonic()
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    rec: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                 "torch": torch.__version__}
    failed = 0

    def run(name: str, fn) -> None:
        nonlocal failed
        t0 = time.perf_counter()
        try:
            rec[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others' figures
            rec[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed += 1
        rec[f"{name}_wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {json.dumps(rec[name], default=str)[:4000]}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rec, indent=1, default=str))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "step" in parts:
        run("step_profile", lambda: step_profile(args, args.top))
    if "depthwise" in parts:
        run("depthwise_kernels", lambda: depthwise_kernels(device, SMALL_DW_SHAPES if args.small else BASE_DW_SHAPES))
    if "stages" in parts:
        batches = [int(b) for b in args.batches.split(",") if b]
        run("conv_stages", lambda: conv_stages(args, device, batches, args.reps, start + args.budget_s))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
