"""Ops kernels: each fused kernel against eager torch and torch.compile, and the MiM step with and without them.

    python benchmarks/ops_kernels.py [--json FILE] [--config base] [--budget-s 160]   # on one GPU, < 3 minutes
    python benchmarks/ops_kernels.py --dry-run                                         # CPU, tiny: checks wiring

All three implementations (and both step backends) are timed in this invocation; every ratio is between them.

Per kernel and direction (forward, forward+backward) it prints the median time of the Triton kernel, of the
eager reference (:mod:`mim_scale.ops.reference`) and of ``torch.compile`` of that reference, the speed-ups, and
the achieved bandwidth as a fraction of the card's peak; the masked depthwise conv is measured at each of
base's conv-stage shapes against eager (cuDNN channels-last, what the model runs) and compile. After the
figures it prints what ``mim_scale.ops.auto``'s rule decides from this run, beside the table's decision.
Bandwidth counts the *useful* bytes: what a single fused pass must read and write (for example, the masked
tokens' predictions and patches, not the visible ones'), the same figure for all three implementations, so the
fraction says how close each gets to the memory limit (the peak is the card's datasheet figure, ``PEAK_BANDWIDTH``).
The end-to-end part times a full training step (forward, backward, AdamW) of
``mim_scale.model.build_model(cfg)`` with the ops backend set to ``reference`` and to ``auto``, and reports
how many calls reached the kernels (0 means the model does not route through ``mim_scale.ops``).

Inputs are synthetic (timings do not depend on the values). The dry run uses CPU tensors: the kernels run in
Triton's interpreter, ``torch.compile`` uses the ``eager`` backend, and every figure is meaningless except
as a proof that each path runs; the end-to-end part is skipped there if the model package is absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mim_scale.ops import reference as R

# Peak HBM bandwidth, bytes/s, by device-name fragment (first match wins; more specific names first).
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
)


def peak_bandwidth(device_name: str) -> float | None:
    for fragment, peak in PEAK_BANDWIDTH:
        if fragment in device_name:
            return peak
    return None


@dataclass
class Timer:
    device: torch.device
    warmup: int
    iters: int

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn`` over ``iters`` runs after ``warmup`` runs."""
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


@dataclass
class Bench:
    name: str
    direction: str  # "fwd" or "fwd+bwd"
    bytes: float  # useful bytes moved by one fused pass
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)  # triton / eager / (compile built later)
    reference_fn: Callable | None = None  # the reference to torch.compile
    make_compiled_call: Callable[[Callable], Callable[[], object]] | None = None
    shape: str = ""  # set when an op is measured at several shapes


# ---------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    views: int  # volumes per loss call (one level's views)
    view: int  # view side
    p: int
    token_rows: int  # views whose tokens are gathered/scattered
    enc_dim: int
    dec_dim: int
    crops: int  # crops per view-construction call
    k2: int
    k3: int
    dw_stages: tuple[tuple[int, int], ...] = ()  # masked depthwise conv: (channels, side) per conv stage
    dw_views: int = 0  # views through the conv stages in one step
    dw_k: int = 5


# base: 21 views (1 + 4 + 16 per crop) through conv stages of 48 ch at 48^3 and 96 ch at 24^3, k = 5
FULL = Sizes(views=16, view=96, p=16, token_rows=84, enc_dim=384, dec_dim=576, crops=2, k2=4, k3=4,
             dw_stages=((48, 48), (96, 24)), dw_views=21, dw_k=5)
TINY = Sizes(views=2, view=16, p=4, token_rows=2, enc_dim=32, dec_dim=48, crops=1, k2=2, k3=2,
             dw_stages=((4, 6),), dw_views=1, dw_k=3)


def _grad_call(fn: Callable, leaf: torch.Tensor, *args) -> Callable[[], object]:
    """Forward and backward of ``fn(leaf, *args)`` with a fixed upstream gradient (made on the first call)."""
    upstream: list[torch.Tensor] = []

    def call():
        out = fn(leaf, *args)
        if not upstream:
            upstream.append(torch.ones_like(out))
        return torch.autograd.grad(out, leaf, grad_outputs=upstream[0])
    return call


def _fwd_and_bwd(name: str, reference: Callable, fused: Callable, args: tuple, fwd_bytes: float,
                 fwd_bwd_bytes: float) -> list[Bench]:
    """A forward and a forward+backward :class:`Bench` of ``reference`` / ``fused`` on ``args``; the backward is
    taken with respect to ``args[0]`` (a leaf that requires grad)."""
    fwd = Bench(name, "fwd", fwd_bytes, reference_fn=reference)
    fwd.impls["eager"] = lambda: reference(*args)
    fwd.impls["triton"] = lambda: fused(*args)
    fwd.make_compiled_call = lambda f: (lambda: f(*args))
    bwd = Bench(name, "fwd+bwd", fwd_bwd_bytes, reference_fn=reference)
    bwd.impls["eager"] = _grad_call(reference, *args)
    bwd.impls["triton"] = _grad_call(fused, *args)
    bwd.make_compiled_call = lambda f: _grad_call(f, *args)
    return [fwd, bwd]


def build_benches(dev: torch.device, z: Sizes, use_triton: bool) -> list[Bench]:
    from types import SimpleNamespace

    from mim_scale.ops import OP_MODULES
    T = SimpleNamespace(**{name: module.fused for name, module in OP_MODULES.items()})
    g = torch.Generator(device="cpu").manual_seed(0)
    bf16 = torch.bfloat16
    benches: list[Bench] = []

    # --- masked normalised-pixel MSE: pred (bf16, as the decoder's head emits under autocast), vol fp32
    n, s, p = z.views, z.view, z.p
    length, e = (s // p) ** 3, p**3
    vol = torch.rand((n, 1, s, s, s), generator=g).to(dev)
    pred = torch.randn((n, length, e), generator=g).to(dev, bf16).requires_grad_(True)
    mask = torch.zeros((n, length))
    for i in range(n):
        mask[i, torch.randperm(length, generator=g)[: length // 2]] = 1.0
    mask = mask.to(dev)
    frac = float(mask.mean())
    read = frac * (pred.numel() * pred.element_size() + vol.numel() * vol.element_size())
    grad_write = pred.numel() * pred.element_size()
    benches += _fwd_and_bwd("masked_norm_pix_mse", R.masked_norm_pix_mse, T.masked_norm_pix_mse, (pred, vol, mask, p),
                            read, 2 * read + grad_write)

    # --- visible-token gather (encoder width) and scatter with the mask token (decoder width)
    rows, k = z.token_rows, length // 2
    x = torch.randn((rows, length, z.enc_dim), generator=g).to(dev, bf16).requires_grad_(True)
    ids = torch.stack([torch.randperm(length, generator=g)[:k].sort().values for _ in range(rows)]).to(dev)
    es = x.element_size()
    gather_rw = 2 * rows * k * z.enc_dim * es
    benches += _fwd_and_bwd("gather_tokens", R.gather_tokens, T.gather_tokens, (x, ids), gather_rw,
                            gather_rw + rows * k * z.enc_dim * es + rows * length * z.enc_dim * es)

    vis = torch.randn((rows, k, z.dec_dim), generator=g).to(dev, bf16).requires_grad_(True)
    fill = torch.randn((z.dec_dim,), generator=g).to(dev, bf16)
    scatter_rw = (rows * k + rows * length) * z.dec_dim * es
    benches += _fwd_and_bwd("scatter_tokens", R.scatter_tokens, T.scatter_tokens, (vis, ids, fill, length),
                            scatter_rw, 2 * scatter_rw)

    # --- all views of a batch of crops (no masks: the model masks inside its conv blocks)
    c2 = 2 * s
    crop = torch.rand((z.crops, 1, c2, c2, c2), generator=g).to(dev)
    octants = torch.stack([torch.randperm(8, generator=g)[: z.k2].sort().values for _ in range(z.crops)]).to(dev)
    picks = torch.randint(0, length, (z.crops, z.k2, z.k3), generator=g).to(dev)
    n_views = z.crops * (1 + z.k2 + z.k2 * z.k3)
    fs = crop.element_size()
    view_bytes = (n_views * s**3 + z.crops * c2**3 + z.crops * z.k2 * s**3 + z.crops * z.k2 * z.k3 * p**3) * fs
    b = Bench("make_views", "fwd", view_bytes, reference_fn=R.make_views)
    b.impls["eager"] = lambda: R.make_views(crop, octants, picks, p)
    b.impls["triton"] = lambda: T.make_views(crop, octants, picks, p)
    b.make_compiled_call = lambda f: (lambda: f(crop, octants, picks, p))
    benches.append(b)

    # --- the conv blocks' masked depthwise conv, channels-last bf16 as under autocast; eager is what the
    # model runs on CUDA (F.conv3d on a channels-last-3d view: cuDNN, if the profile confirms it)
    for ch, side in z.dw_stages:
        benches += _depthwise_benches(dev, g, T, z.dw_views, ch, side, z.dw_k)

    if not use_triton:
        for b in benches:
            b.impls.pop("triton")
    return benches


def _depthwise_benches(dev: torch.device, g: torch.Generator, T, views: int, ch: int, side: int,
                       k: int) -> list[Bench]:
    bf16 = torch.bfloat16
    x = torch.randn((views, side, side, side, ch), generator=g).to(dev, bf16).requires_grad_(True)
    keep = (torch.rand((views, side, side, side, 1), generator=g) < 0.4).to(dev, bf16)
    w = (torch.randn((ch, 1, k, k, k), generator=g) / k**1.5).to(dev, bf16).requires_grad_(True)
    bias = torch.zeros((ch,)).to(dev, bf16).requires_grad_(True)
    act = x.numel() * x.element_size()
    out = []
    for direction, nbytes in (("fwd", 2 * act), ("fwd+bwd", 2 * act + 3 * act)):  # fwd: x in, y out
        b = Bench("masked_depthwise_conv3d", direction, nbytes, reference_fn=R.masked_depthwise_conv3d,
                  shape=f"{views}x{ch}x{side}^3 k{k}")
        if direction == "fwd":
            b.impls["eager"] = lambda: R.masked_depthwise_conv3d(x, keep, w, bias)
            b.impls["triton"] = lambda: T.masked_depthwise_conv3d(x, keep, w, bias)
            b.make_compiled_call = lambda f: (lambda: f(x, keep, w, bias))
        else:
            b.impls["eager"] = _grad_call_all(R.masked_depthwise_conv3d, (x, w, bias), x, keep, w, bias)
            b.impls["triton"] = _grad_call_all(T.masked_depthwise_conv3d, (x, w, bias), x, keep, w, bias)
            b.make_compiled_call = lambda f: _grad_call_all(f, (x, w, bias), x, keep, w, bias)
        out.append(b)
    return out


def _grad_call_all(fn: Callable, leaves: tuple[torch.Tensor, ...], *args) -> Callable[[], object]:
    """Forward and backward of ``fn(*args)`` w.r.t. every tensor in ``leaves``, fixed upstream gradient."""
    upstream: list[torch.Tensor] = []

    def call():
        out = fn(*args)
        if not upstream:
            upstream.append(torch.ones_like(out))
        return torch.autograd.grad(out, leaves, grad_outputs=upstream[0])
    return call


def auto_decisions(records: list[dict], device_name: str) -> list[str]:
    """What :func:`mim_scale.ops.auto.wins` decides from this run's figures, beside what the table says now."""
    from mim_scale.ops import auto

    lines = []
    for op, direction in auto.MODEL_PASS.items():
        recs = [r for r in records if r["kernel"] == op and r["direction"] == direction and "speedup_vs_eager" in r]
        if not recs:
            lines.append(f"auto {op}: no figure in this run")
            continue
        # an op measured at several shapes must win at every one
        worst = min(recs, key=lambda r: r["speedup_vs_eager"])
        fig = auto.Figure(direction, worst["speedup_vs_eager"], min(r.get("speedup_vs_compile", 0.0) for r in recs),
                          "this run")
        table = auto.MEASURED.get(device_name, {}).get(op)
        lines.append(f"auto {op}: this run says {'on' if auto.wins(op, fig) else 'off'} ({direction} "
                     f"x{fig.vs_eager:.2f} vs eager, x{fig.vs_compile:.2f} vs compile, worst shape); "
                     f"table for {device_name!r}: {'on' if auto.wins(op, table) else 'off'}")
    return lines


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def run_kernels(dev: torch.device, z: Sizes, timer: Timer, compile_backend: str | None, peak: float | None,
                deadline: float, log) -> list[dict]:
    records = []
    compiled: dict[int, Callable] = {}
    for b in build_benches(dev, z, use_triton=True):
        rec: dict = {"kernel": b.name, "direction": b.direction, "useful_bytes": b.bytes, "ms": {}}
        if b.shape:
            rec["shape"] = b.shape
        for impl, fn in b.impls.items():
            rec["ms"][impl] = timer(fn)
        if compile_backend is not None and time.monotonic() < deadline:
            key = id(b.reference_fn)
            if key not in compiled:
                compiled[key] = torch.compile(b.reference_fn, backend=compile_backend, dynamic=False)
            call = b.make_compiled_call(compiled[key])
            t0 = time.perf_counter()
            call()  # compiles (once per graph)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
            rec["ms"]["compile"] = timer(call)
        elif compile_backend is not None:
            rec["skipped_compile"] = "time budget spent"
        ms = rec["ms"]
        if "triton" in ms:
            rec["speedup_vs_eager"] = ms["eager"] / ms["triton"]
            if "compile" in ms:
                rec["speedup_vs_compile"] = ms["compile"] / ms["triton"]
        rec["gbps"] = {k: b.bytes / (v * 1e-3) / 1e9 for k, v in ms.items()}
        if peak:
            rec["frac_of_peak"] = {k: b.bytes / (v * 1e-3) / peak for k, v in ms.items()}
        records.append(rec)
        log(_format_kernel(rec))
    return records


def _format_kernel(rec: dict) -> str:
    ms = rec["ms"]
    parts = [f"{rec['kernel'] + (' ' + rec['shape'] if 'shape' in rec else ''):44s} {rec['direction']:8s}"]
    for impl in ("triton", "eager", "compile"):
        if impl in ms:
            frac = rec.get("frac_of_peak", {}).get(impl)
            extra = f" ({frac * 100:5.1f}% peak)" if frac is not None else f" ({rec['gbps'][impl]:7.1f} GB/s)"
            parts.append(f"{impl} {ms[impl]:8.3f} ms{extra}")
    if "speedup_vs_eager" in rec:
        parts.append(f"x{rec['speedup_vs_eager']:.2f} vs eager")
    if "speedup_vs_compile" in rec:
        parts.append(f"x{rec['speedup_vs_compile']:.2f} vs compile")
    if "skipped_compile" in rec:
        parts.append("compile skipped: " + rec["skipped_compile"])
    return " | ".join(parts)


def run_end_to_end(dev: torch.device, config: str, batch: int, timer: Timer, dry_run: bool, log) -> dict:
    from mim_scale import ops
    from mim_scale.config import load_config

    try:
        from mim_scale.model import build_model
    except ImportError as exc:
        if dry_run:
            log(f"end-to-end: skipped in the dry run, mim_scale.model is not importable ({exc})")
            return {"skipped": f"mim_scale.model not importable: {exc}"}
        raise
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    side = cfg.data.crop_size
    crops = torch.rand((batch, cfg.model.in_channels, side, side, side), device=dev)
    gen = torch.Generator(device=dev)
    use_autocast = dev.type == "cuda"

    def step():
        gen.manual_seed(0)  # the same masks every step, so both backends do the same work
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
            losses = model(crops, generator=gen)
        losses["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses

    out: dict = {"config": config, "batch": batch, "crop": side, "autocast_bf16": use_autocast}
    # "auto" is the production setting; on CPU (the dry run) it means the references, since the interpreted
    # kernels would take minutes for a whole step: the dry run checks this harness, the kernel part the kernels.
    variants = [("without_kernels", "reference"), ("auto", "auto")]
    if dev.type == "cuda":
        variants.append(("all_kernels", "triton"))  # every fused kernel forced, to show each one's share
    for label, backend in variants:
        with ops.backend(backend):
            before = dict(ops.calls)
            ms = timer(step)
            calls = {f"{op}:{path}": n - before.get((op, path), 0) for (op, path), n in ops.calls.items()
                     if n - before.get((op, path), 0)}
        out[label] = {"backend": backend, "ms_per_step": ms, "calls": calls}
        if dev.type == "cuda":
            out[label]["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
    fused = "all_kernels" if "all_kernels" in out else "auto"
    out["speedup"] = out["without_kernels"]["ms_per_step"] / out["auto"]["ms_per_step"]
    kernel_calls = sum(n for k, n in out[fused]["calls"].items() if k.endswith(":triton"))
    out["kernel_calls"] = kernel_calls
    extra = ""
    if fused == "all_kernels":
        out["speedup_all_kernels"] = out["without_kernels"]["ms_per_step"] / out["all_kernels"]["ms_per_step"]
        extra = (f", every kernel forced {out['all_kernels']['ms_per_step']:.1f} ms/step "
                 f"(x{out['speedup_all_kernels']:.3f}, calls {out['all_kernels']['calls']})")
    log(f"end-to-end {config} batch {batch}: without kernels {out['without_kernels']['ms_per_step']:.1f} ms/step, "
        f"auto {out['auto']['ms_per_step']:.1f} ms/step (x{out['speedup']:.3f}){extra}")
    if kernel_calls == 0 and dev.type == "cuda":
        log("  note: no call reached a kernel: the model does not route these ops through mim_scale.ops")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/ops_kernels.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, one iteration: check the wiring")
    ap.add_argument("--json", default=None, help="write all figures to this file")
    ap.add_argument("--config", default=None, help="model preset for the end-to-end step (default: base; tiny "
                    "in the dry run)")
    ap.add_argument("--batch", type=int, default=1, help="crops per end-to-end step")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="skip remaining torch.compile runs after this many seconds")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end step")
    args = ap.parse_args(argv)

    start = time.monotonic()
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        print(msg, flush=True)

    from mim_scale import ops
    if not ops.triton_available():
        print(f"error: triton is not importable ({ops.TRITON_IMPORT_ERROR}); the benchmark needs it", file=sys.stderr)
        return 2
    if args.dry_run:
        dev, sizes, timer, compile_backend = torch.device("cpu"), TINY, Timer(torch.device("cpu"), 0, 1), "eager"
        device_name, peak = "cpu (dry run: figures are not measurements)", None
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
        dev = torch.device("cuda")
        sizes, timer, compile_backend = FULL, Timer(dev, warmup=3, iters=20), "inductor"
        device_name = torch.cuda.get_device_name()
        peak = peak_bandwidth(device_name)
    if args.no_compile:
        compile_backend = None
    log(f"device: {device_name}; peak bandwidth: {peak / 1e12 if peak else 'unknown'} TB/s; torch {torch.__version__}")
    result: dict = {"device": device_name, "peak_bandwidth": peak, "dry_run": args.dry_run,
                    "torch": torch.__version__, "sizes": dataclasses.asdict(sizes)}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass
    def dump() -> None:  # after every phase, so a run cut short by a time limit still leaves its figures
        if args.json:
            result["seconds"] = round(time.monotonic() - start, 1)
            Path(args.json).write_text(json.dumps(result, indent=1))

    result["kernels"] = run_kernels(dev, sizes, timer, compile_backend, peak, start + args.budget_s, log)
    result["auto_decisions"] = auto_decisions(result["kernels"], device_name)
    for line in result["auto_decisions"]:
        log(line)
    dump()
    status = 0
    if not args.no_e2e:
        config = args.config or ("tiny" if args.dry_run else "base")
        # one warm-up step absorbs kernel compilation and allocator growth; a step is long enough that the
        # median of three is stable
        e2e_timer = Timer(dev, 0, 1) if args.dry_run else Timer(dev, warmup=1, iters=3)
        try:
            result["end_to_end"] = run_end_to_end(dev, config, args.batch, e2e_timer, args.dry_run, log)
        except Exception as exc:  # report, keep the kernel figures
            log(f"end-to-end: FAILED: {type(exc).__name__}: {exc}")
            result["end_to_end"] = {"error": f"{type(exc).__name__}: {exc}"}
            status = 1
    dump()
    log(f"total {round(time.monotonic() - start, 1)} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
