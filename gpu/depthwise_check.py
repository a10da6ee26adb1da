"""The MiM step's depthwise 5x5x5 convs on a GPU: which layout and which backward is fastest.

The H200 profile of a base step (docs/gpu-results) is bound by depthwise 3D convs. This measures, at
base's conv-stage shapes (21 views; 48 ch at 48^3, 96 at 24^3, 192 at 12^3; bf16), forward and
forward + backward of:

- ``native_cl``: ``F.conv3d`` on the channels-last-3d input the model passes today;
- ``native_ncdhw``: the same on a contiguous (N, C, D, H, W) copy;
- ``custom``: ``mim_scale.model.layers._DepthwiseConv3dFn`` (the CPU backward: grad-input as a conv with
  the flipped kernel, grad-weight one view at a time), to see whether it also helps on CUDA.

    python gpu/depthwise_check.py --json depthwise.json            # on the GPU machine (gpu/run_all.sh)
    python gpu/depthwise_check.py --device cpu --small              # smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from mim_scale.model.layers import _DepthwiseConv3dFn

BASE_SHAPES = ((21, 48, 48), (21, 96, 24), (21, 192, 12))
SMALL_SHAPES = ((2, 8, 12), (2, 16, 6))


def best_ms(fn, device: torch.device, reps: int) -> float:
    """Best-of-``reps`` milliseconds of ``fn()`` after one warm-up call (CUDA synchronised around each call)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def measure(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype, reps: int) -> list[dict]:
    n, c, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x_cl = torch.randn(n, c, d, d, d, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last_3d)
    x_nc = x_cl.contiguous()
    w = (torch.randn(c, 1, 5, 5, 5, generator=g) * 0.05).to(device, dtype)
    b = torch.zeros(c, device=device, dtype=dtype)
    gout_nc = torch.randn(n, c, d, d, d, generator=g).to(device, dtype)
    gout_cl = gout_nc.contiguous(memory_format=torch.channels_last_3d)  # each layout's gradient made once, untimed
    native = lambda x, w_: F.conv3d(x, w_, b, padding=2, groups=c)  # noqa: E731
    variants = {
        "native_cl": (x_cl, gout_cl, native),
        "native_ncdhw": (x_nc, gout_nc, native),
        "custom": (x_cl, gout_cl, lambda x, w_: _DepthwiseConv3dFn.apply(x, w_, b, 2)),
    }
    rows = []
    reference = None
    for name, (x0, gout, conv) in variants.items():
        x = x0.detach().clone().requires_grad_(True)
        wp = w.detach().clone().requires_grad_(True)

        def forward():
            with torch.no_grad():
                conv(x, wp)

        def forward_backward():
            x.grad = wp.grad = None
            conv(x, wp).backward(gout)

        fwd_ms = best_ms(forward, device, reps)
        fb_ms = best_ms(forward_backward, device, reps)
        grads = (x.grad.float(), wp.grad.float())
        if reference is None:
            reference = grads
        err = max(float((a - r).abs().max() / r.abs().max().clamp_min(1e-12)) for a, r in zip(grads, reference))
        rows.append({"shape": list(shape), "variant": name, "dtype": str(dtype).replace("torch.", ""),
                     "forward_ms": fwd_ms, "forward_backward_ms": fb_ms, "grad_rel_err_vs_native_cl": err})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for shape in SMALL_SHAPES if args.small else BASE_SHAPES:
        for row in measure(shape, device, dtype, args.reps):
            row["device"] = name
            rows.append(row)
            print(f"{name} {tuple(row['shape'])} {row['dtype']} {row['variant']:13s} fwd {row['forward_ms']:8.2f} ms  "
                  f"fwd+bwd {row['forward_backward_ms']:8.2f} ms  grad err {row['grad_rel_err_vs_native_cl']:.1e}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
