"""GPU checks of the training engine: MiM step time, MFU and memory, plain and under DeepSpeed ZeRO.

Run by ``gpu/run_all.sh`` on a lent GPU machine (no network there); results as JSON on stdout and in
``--json``. Input crops are HU-realistic synthetic phantoms cut to the crop size (this check measures
speed, not learning; the CPU tests cover learning on real CT).

    python gpu/engine_check.py --json out.json                 # base (plain torch) + large + huge
    python gpu/engine_check.py --only large --steps 3 --append --json engine.json   # ZeRO-3
    python gpu/engine_check.py --only huge --steps 2 --append --json engine.json    # ZeRO-3 + CPU offload

The engine part uses one process (world size 1) with NCCL: ZeRO-3 still partitions, gathers and
re-partitions every parameter, so its overhead is measured; memory savings need several GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def phantom_crops(batch: int, size: int, device) -> torch.Tensor:
    """(B, 1, S, S, S) in [0, 1]: a body ellipsoid of soft tissue with denser organs and lung air."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij")
    body = (x**2 / 0.8 + y**2 / 0.6 + z**2) < 0.9
    hu = torch.full((size, size, size), -1000.0)
    hu[body] = 40.0
    hu[((x - 0.3) ** 2 + y**2 + z**2) < 0.08] = 90.0  # liver-like
    hu[((x + 0.35) ** 2 + (y + 0.1) ** 2 + z**2) < 0.05] = -800.0  # lung-like
    hu[(x**2 + (y - 0.45) ** 2) < 0.01] = 700.0  # spine-like
    crops = []
    for _ in range(batch):
        noisy = hu + 20 * torch.randn(hu.shape, generator=g)
        crops.append(((noisy.clamp(-1000, 1000) + 1000) / 2000).unsqueeze(0))
    return torch.stack(crops).to(device)


def peak_flops() -> float:
    from mim_scale.metrics import device_peak_flops

    return device_peak_flops("bf16") or 0.0  # dense bf16, the one table (mim_scale/metrics/mfu.py)


def time_plain(size: str, steps: int, batch: int) -> dict:
    """Plain torch: bf16 weights' autocast step (forward + backward + fused AdamW) of the MiM model."""
    from mim_scale.config import load_config
    from mim_scale.model import build_model, flops_per_sample, param_groups

    cfg = load_config(size)
    model = build_model(cfg).cuda()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    crops = phantom_crops(batch, cfg.data.crop_size, "cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(crops, generator=torch.Generator(device="cuda").manual_seed(i))
        out["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = sorted(times[2:])[len(times[2:]) // 2]
    flops = flops_per_sample(cfg) * batch
    return {"size": size, "mode": "torch autocast bf16", "batch": batch, "step_s": step,
            "crops_per_s": batch / step, "flops_per_crop": flops_per_sample(cfg),
            "mfu": flops / step / peak_flops() if peak_flops() else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss": float(out["total"].detach()), "params": sum(p.numel() for p in model.parameters())}


def time_deepspeed(size: str, steps: int, batch: int, zero: int, offload: bool = False) -> dict:
    """The project's DeepSpeed engine (bf16, ZeRO stage ``zero``, FusedAdam, or DeepSpeedCPUAdam with the
    optimizer state offloaded to CPU) on one GPU: step time and peak GPU memory."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    # DeepSpeed's op builder cannot parse arch names such as "9.0a"; name the plain arch for its JIT build
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    from mim_scale.config import load_config
    from mim_scale.engine.deepspeed_engine import build_engine, build_model, init_distributed
    from mim_scale.model import flops_per_sample

    cfg = load_config(size, [f"train.zero_stage={zero}", "launch.use_gpu=true", f"train.micro_batch={batch}",
                             "train.precision=bf16", "train.steps=100",
                             f"train.offload_optimizer={'true' if offload else 'false'}"])
    init_distributed(True)
    torch.cuda.set_device(0)
    model = build_model(cfg, 1)  # the engine's own construction: under ZeRO-3 inside deepspeed.zero.Init
    t0 = time.perf_counter()
    engine, _, _ = build_engine(cfg, model, 1)
    build_s = time.perf_counter() - t0
    crops = phantom_crops(batch, cfg.data.crop_size, "cuda").bfloat16()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = engine(crops, generator=torch.Generator(device="cuda").manual_seed(i))
        engine.backward(out["total"])
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = sorted(times[2:])[len(times[2:]) // 2]
    flops = flops_per_sample(cfg) * batch
    mode = f"deepspeed zero{zero} bf16 " + ("optimizer offloaded to CPU (DeepSpeedCPUAdam)" if offload else "FusedAdam")
    return {"size": size, "mode": mode, "batch": batch, "step_s": step,
            "engine_build_s": build_s, "crops_per_s": batch / step,
            "mfu": flops / step / peak_flops() if peak_flops() else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(out["total"].float()),
            "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())}


def profile_plain(size: str, batch: int, top: int = 20) -> dict:
    """The CUDA kernels that take a base step's time (torch profiler, one step after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    from mim_scale.config import load_config
    from mim_scale.model import build_model

    cfg = load_config(size)
    model = build_model(cfg).cuda()
    crops = phantom_crops(batch, cfg.data.crop_size, "cuda")

    def step(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(crops, generator=torch.Generator(device="cuda").manual_seed(i))
        out["total"].backward()
        model.zero_grad(set_to_none=True)

    step(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step(1)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)
    print(table)
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    return {"size": size, "mode": "profile", "batch": batch,
            "top_cuda_ms": [(e.key[:80], round(e.device_time_total / 1e3, 2), e.count) for e in rows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["base", "large", "huge"], default=None,
                   help="base: plain-torch step + profile; large: ZeRO-3; huge: ZeRO-3 + CPU optimizer offload")
    p.add_argument("--append", action="store_true", help="add to the runs already in --json (one process per size)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine_check: no CUDA device", file=sys.stderr)
        return 2
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    if args.append and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results["runs"] = json.load(f).get("runs", [])

    first_new = len(results["runs"])

    def record(fn, *a):
        try:
            r = fn(*a)
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others' figures
            r = {"args": list(map(str, a)), "error": f"{type(exc).__name__}: {exc}"}
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        torch.cuda.empty_cache()

    if args.only in (None, "base"):
        for batch in (1, 4):
            record(time_plain, "base", args.steps, batch)
    if args.only in (None, "large"):
        record(time_deepspeed, "large", args.steps, 1, 3)  # the recipe's micro-batch
    if args.only in (None, "huge"):
        record(time_deepspeed, "huge", args.steps, 1, 3, True)
    if args.only in (None, "base"):
        record(profile_plain, "base", 1)
    return 0 if all("error" not in r for r in results["runs"][first_new:]) else 1


if __name__ == "__main__":
    sys.exit(main())
