"""Parity checks: every Triton kernel against its plain-torch reference, forward and backward.

The cases are shared by the unit tests (``tests/ops``: CPU, Triton's interpreter, sizes <= 32^3) and the GPU
self-check (``python -m mim_scale.ops.parity --device cuda``: the same cases compiled, plus full-size ones).
Inputs are crops of a real CT volume (HU window [-1000, 1000] scaled to [0, 1]) when one is given, so the
patches include the constant air regions where the normalisation is most sensitive.

Each ``check_*`` calls the op's Triton path directly (its file's ``fused``), never the dispatcher, and
raises ``AssertionError`` naming the case and the worst error when a result differs beyond tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import reference as R


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def load_ct_source(path: str | Path) -> torch.Tensor:
    """A NIfTI CT in HU -> (D, H, W) float32 in [0, 1] (window [-1000, 1000]); clear error if unreadable."""
    path = Path(path)
    try:
        import nibabel as nib
        data = nib.load(str(path)).get_fdata(dtype="float32")
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: CT volume not found") from exc
    except Exception as exc:  # nibabel raises several types for a corrupt or foreign file
        raise ValueError(f"{path}: cannot read as a NIfTI CT volume ({exc})") from exc
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D CT volume, got shape {data.shape}")
    vol = torch.from_numpy(data).clamp_(-1000.0, 1000.0)
    return ((vol + 1000.0) / 2000.0).contiguous()


def synthetic_source(size: int = 128, seed: int = 0) -> torch.Tensor:
    """Smooth random volume in [0, 1] with a constant (air) slab: only for scale where no CT is at hand."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, size // 8, size // 8, size // 8), generator=g)
    vol = torch.nn.functional.interpolate(coarse, size=(size, size, size), mode="trilinear", align_corners=False)[0, 0]
    vol = vol + 0.05 * torch.rand((size, size, size), generator=g)
    vol[: size // 4] = 0.0
    return vol.clamp_(0.0, 1.0).contiguous()


def crops(source: torch.Tensor, n: int, c: int, shape: tuple[int, int, int], seed: int,
          dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """(n, c, *shape) random crops of ``source`` (padded with 0 = air where it is smaller); the channels are
    crops at different places, so channels differ."""
    g = torch.Generator().manual_seed(seed)
    pads = [max(0, s - d) for s, d in zip(shape, source.shape)]
    src = torch.nn.functional.pad(source, (0, pads[2], 0, pads[1], 0, pads[0])) if any(pads) else source
    out = torch.empty((n, c) + tuple(shape))
    for i in range(n):
        for j in range(c):
            z, y, x = (int(torch.randint(0, d - s + 1, (1,), generator=g)) for d, s in zip(src.shape, shape))
            out[i, j] = src[z:z + shape[0], y:y + shape[1], x:x + shape[2]]
    return out.to(device=device, dtype=dtype)


def _seed(name: str) -> int:
    """A per-case seed that is stable across processes (str hashes are salted)."""
    return zlib.crc32(name.encode())


def _mask(kind: str, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    if kind == "all":
        return torch.ones((n, length))
    if kind == "none":
        return torch.zeros((n, length))
    m = torch.zeros((n, length))
    for i in range(n):  # MAE-style: a fixed count of masked tokens per row
        m[i, torch.randperm(length, generator=g)[: max(1, (length * 6) // 10)]] = 1.0
    return m


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max()) if a.numel() else 0.0


def _assert_close(name: str, what: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> float:
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"[{name}] {what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if got.dtype != want.dtype:
        raise AssertionError(f"[{name}] {what}: dtype {got.dtype} != reference {want.dtype}")
    err = _max_err(got, want)
    scale = float(want.detach().double().abs().max()) if want.numel() else 0.0
    if not math.isfinite(err) or err > atol + rtol * scale:
        raise AssertionError(f"[{name}] {what}: max |triton - reference| = {err:.3e} > {atol:.1e} + {rtol:.1e} x "
                             f"{scale:.3e}")
    return err


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MSECase:
    name: str
    n: int
    c: int
    shape: tuple[int, int, int]
    p: int
    mask: str = "random"  # random | all | none
    dtype: str = "float32"
    max_block: int | None = None  # force the chunked path with a small block


@dataclass(frozen=True)
class TokenCase:
    name: str
    n: int
    length: int
    e: int
    k: int  # gathered (visible) tokens per row
    dtype: str = "float32"
    duplicates: bool = False  # repeated ids (gather only)


@dataclass(frozen=True)
class ViewCase:
    name: str
    n: int
    c: int
    crop: int
    p: int
    k2: int
    k3: int
    mask: str | None = "random"  # random | all | none | None (no masks)
    dtype: str = "float32"


MSE_CASES = [
    MSECase("p4_16cube", 2, 1, (16, 16, 16), 4),
    MSECase("p3_odd_15cube", 2, 1, (15, 15, 15), 3),
    MSECase("c2_odd_grid_20cube", 1, 2, (20, 20, 20), 4),
    MSECase("non_cubic_8x12x16", 2, 1, (8, 12, 16), 4),
    MSECase("p8_32cube", 1, 1, (32, 32, 32), 8),
    MSECase("chunked_c3", 1, 3, (12, 12, 12), 4, max_block=64),
    MSECase("chunked_tail_p3", 1, 1, (9, 9, 9), 3, max_block=8),
    MSECase("all_masked", 2, 1, (16, 16, 16), 4, mask="all"),
    MSECase("none_masked", 2, 1, (16, 16, 16), 4, mask="none"),
    MSECase("bf16", 2, 1, (16, 16, 16), 4, dtype="bfloat16"),
]
MSE_CASES_BIG = [
    MSECase("big_p16_96cube", 4, 1, (96, 96, 96), 16),
    MSECase("big_p16_96cube_bf16", 4, 1, (96, 96, 96), 16, dtype="bfloat16"),
    MSECase("big_p32_chunked", 2, 1, (96, 96, 96), 32),
]

TOKEN_CASES = [
    TokenCase("e48", 2, 64, 48, 25),
    TokenCase("odd_e37", 3, 27, 37, 13),
    TokenCase("all_masked_k0", 2, 64, 48, 0),
    TokenCase("none_masked_kL", 2, 27, 40, 27),
    TokenCase("wide_e1500", 2, 8, 1500, 3),
    TokenCase("bf16", 2, 64, 48, 25, dtype="bfloat16"),
    TokenCase("duplicate_ids", 2, 16, 24, 12, duplicates=True),
]
TOKEN_CASES_BIG = [
    TokenCase("big_l216_e384", 21, 216, 384, 108),
    TokenCase("big_l216_e576_bf16", 21, 216, 576, 86, dtype="bfloat16"),
]

VIEW_CASES = [
    ViewCase("crop32_p4", 2, 1, 32, 4, 4, 2),
    ViewCase("odd_grid_crop24_c2_nomask", 1, 2, 24, 4, 3, 1, mask=None),
    ViewCase("odd_p3_crop18", 1, 1, 18, 3, 2, 2),
    ViewCase("p8_all_masked", 1, 1, 32, 8, 2, 3, mask="all"),
    ViewCase("none_masked", 1, 1, 16, 4, 2, 2, mask="none"),
    ViewCase("level1_only", 2, 1, 16, 4, 0, 0),
    ViewCase("levels12_only", 1, 1, 16, 4, 3, 0),
    ViewCase("bf16", 1, 1, 32, 4, 2, 2, dtype="bfloat16"),
]
VIEW_CASES_BIG = [
    ViewCase("big_crop192_p16", 1, 1, 192, 16, 4, 4),
    ViewCase("big_crop192_p16_bf16", 2, 1, 192, 16, 4, 4, dtype="bfloat16"),
]



@dataclass(frozen=True)
class DWCase:
    name: str
    n: int
    shape: tuple[int, int, int]  # D, H, W
    c: int
    k: int
    keep: str | None = "random"  # random | all | none | None (dense: no mask)
    dtype: str = "float32"
    bias: bool = True


# Tiny on purpose: the interpreter runs every tap of every program in Python (each case ~1-2 s on CPU).
DW_CASES = [
    DWCase("odd_5x6x7_c5_k3", 2, (5, 6, 7), 5, 3),
    DWCase("k5_c3_4cube_none_masked", 1, (4, 4, 4), 3, 5, keep="none"),
    DWCase("all_masked_c4", 1, (5, 3, 4), 4, 3, keep="all"),
    DWCase("dense_no_bias_c2", 1, (3, 3, 3), 2, 3, keep=None, bias=False),
    DWCase("bf16_c6", 2, (6, 5, 4), 6, 3, dtype="bfloat16"),
    DWCase("wide_c40_two_channel_blocks", 1, (3, 4, 3), 40, 3),
]
# base's conv-stage shapes per view (48 ch at 48^3, 96 ch at 24^3, k = 5), bf16 as under autocast; fewer views
# than a step's 21, to keep the fp64 reference (PyTorch's slow native depthwise path) within seconds
DW_CASES_BIG = [
    DWCase("big_base_stage1_bf16", 4, (48, 48, 48), 48, 5, dtype="bfloat16"),
    DWCase("big_base_stage2_bf16", 8, (24, 24, 24), 96, 5, dtype="bfloat16"),
    DWCase("big_stage2_fp32_odd", 2, (25, 23, 24), 96, 5),
]
# Output and input gradient are stored in x's dtype: bf16 rounds each to 8 bits (<= 2^-8 of its value), so
# they are checked within 1e-2 x max|reference|; fp32 within 1e-5. Weight and bias gradients are fp32 sums
# over every voxel, in a different order than torch's: 1e-4 (1e-3 over the millions of voxels of the big cases).
_DW_TOL = {"float32": 1e-5, "bfloat16": 1e-2}

_TOL = {"float32": (2e-5, 2e-5), "bfloat16": (2e-2, 2e-2)}


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------


def check_mse(case: MSECase, source: torch.Tensor, device: str = "cpu") -> dict:
    """Fused masked normalised-pixel MSE vs reference: loss and d(loss * g)/d(pred)."""
    from . import loss as K

    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(_seed(case.name))
    vol = crops(source, case.n, case.c, case.shape, seed=_seed(case.name) % 1000, dtype=dtype, device=device)
    length = math.prod(s // case.p for s in case.shape)
    e = case.p**3 * case.c
    pred0 = torch.randn((case.n, length, e), generator=g).to(device=device, dtype=dtype)
    mask = _mask(case.mask, case.n, length, g).to(device)
    upstream = 1.7

    saved = K.MAX_PATCH_BLOCK
    if case.max_block is not None:
        K.MAX_PATCH_BLOCK = case.max_block
    try:
        pred = pred0.clone().requires_grad_(True)
        got = K.fused(pred, vol, mask, case.p)
        (got * upstream).backward()
        got_grad = pred.grad
    finally:
        K.MAX_PATCH_BLOCK = saved
    ref_pred = pred0.clone().requires_grad_(True)
    want = R.masked_norm_pix_mse(ref_pred, vol, mask, case.p)
    (want * upstream).backward()

    atol, rtol = _TOL[case.dtype]
    err_loss = _assert_close(case.name, "loss", got, want, atol=1e-5, rtol=1e-4)
    err_grad = _assert_close(case.name, "grad pred", got_grad, ref_pred.grad, atol=atol * 1e-2, rtol=rtol)
    if case.mask == "none" and (got.item() != 0.0 or bool(got_grad.abs().max() > 0)):
        raise AssertionError(f"[{case.name}] nothing masked, yet loss {got.item()} or a non-zero gradient")
    return {"loss": got.item(), "err_loss": err_loss, "err_grad": err_grad}


def _ids(case: TokenCase, g: torch.Generator) -> torch.Tensor:
    if case.duplicates:
        return torch.randint(0, case.length, (case.n, case.k), generator=g)
    return torch.stack([torch.randperm(case.length, generator=g)[: case.k] for _ in range(case.n)])


def check_gather(case: TokenCase, device: str = "cpu") -> dict:
    """Visible-token gather vs reference: values exactly, gradient w.r.t. x (with repeated ids summed)."""
    from .gather import fused

    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(_seed(case.name))
    x0 = torch.randn((case.n, case.length, case.e), generator=g).to(device=device, dtype=dtype)
    ids = _ids(case, g).to(device)
    w = torch.randn((case.n, case.k, case.e), generator=g).to(device=device, dtype=dtype)
    x = x0.clone().requires_grad_(True)
    got = fused(x, ids)
    (got.float() * w.float()).sum().backward()
    xr = x0.clone().requires_grad_(True)
    want = R.gather_tokens(xr, ids)
    (want.float() * w.float()).sum().backward()
    atol, rtol = _TOL[case.dtype]
    return {"err_out": _assert_close(case.name, "gather", got, want, 0.0, 0.0),
            "err_grad": _assert_close(case.name, "grad x", x.grad, xr.grad, atol, rtol)}


def check_scatter(case: TokenCase, device: str = "cpu") -> dict:
    """Scatter with mask token vs reference: values exactly, gradients w.r.t. visible and the fill token."""
    from .scatter import fused

    if case.duplicates:
        raise ValueError(f"[{case.name}] scatter parity needs distinct ids (which duplicate lands is unspecified)")
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(_seed(case.name) + 1)
    vis0 = torch.randn((case.n, case.k, case.e), generator=g).to(device=device, dtype=dtype)
    fill0 = torch.randn((case.e,), generator=g).to(device=device, dtype=dtype)
    ids = _ids(case, g).to(device)
    w = torch.randn((case.n, case.length, case.e), generator=g).to(device=device, dtype=dtype)
    vis, fill = vis0.clone().requires_grad_(True), fill0.clone().requires_grad_(True)
    got = fused(vis, ids, fill, case.length)
    (got.float() * w.float()).sum().backward()
    vr, fr = vis0.clone().requires_grad_(True), fill0.clone().requires_grad_(True)
    want = R.scatter_tokens(vr, ids, fr, case.length)
    (want.float() * w.float()).sum().backward()
    atol, rtol = _TOL[case.dtype]
    return {"err_out": _assert_close(case.name, "scatter", got, want, 0.0, 0.0),
            "err_grad_visible": _assert_close(case.name, "grad visible", vis.grad, vr.grad, atol, rtol),
            # the fill gradient sums many rows: the order of the sums differs, so allow more
            "err_grad_fill": _assert_close(case.name, "grad fill", fill.grad, fr.grad, atol * 10, rtol)}


def check_views(case: ViewCase, source: torch.Tensor, device: str = "cpu") -> dict:
    """Fused view construction vs reference.make_views, level by level."""
    from .views import fused

    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(_seed(case.name))
    crop = crops(source, case.n, case.c, (case.crop,) * 3, seed=_seed(case.name) % 1000, dtype=dtype, device=device)
    s = case.crop // 2
    length = (s // case.p) ** 3
    octants = torch.stack([torch.randperm(8, generator=g)[: case.k2] for _ in range(case.n)]).to(device)
    picks = torch.stack([torch.stack([torch.randperm(length, generator=g)[: case.k3] for _ in range(case.k2)])
                         if case.k2 else torch.zeros((0, case.k3), dtype=torch.long)
                         for _ in range(case.n)]).to(device)
    masks = None
    if case.mask is not None:
        rows = (case.n, case.n * case.k2, case.n * case.k2 * case.k3)
        masks = tuple(_mask(case.mask, r, length, g).to(device) for r in rows)
    got = fused(crop, octants, picks, case.p, masks)
    want = R.make_views(crop, octants, picks, case.p, masks)
    atol, rtol = _TOL[case.dtype]
    out = {}
    for level, (a, b) in enumerate(zip(got, want), start=1):
        out[f"err_level{level}"] = _assert_close(case.name, f"level-{level} views", a, b, atol, 0.0)
    return out


def dw_inputs(case: DWCase, source: torch.Tensor, device: str = "cpu"):
    """x (N, D, H, W, C) channels-last cut from the CT, keep (N, D, H, W, 1) or None, weight, bias."""
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(_seed(case.name))
    x = crops(source, case.n, case.c, case.shape, seed=_seed(case.name) % 1000)
    x = (x - 0.5).permute(0, 2, 3, 4, 1).contiguous().to(device=device, dtype=dtype)  # centred, like pw1's output
    keep = None
    if case.keep == "random":
        keep = (torch.rand((case.n, *case.shape, 1), generator=g) < 0.4).float()  # MiM keeps ~40 % of level 1
    elif case.keep in ("all", "none"):  # all masked: keep nothing; none masked: keep everything
        keep = torch.full((case.n, *case.shape, 1), 0.0 if case.keep == "all" else 1.0)
    keep = None if keep is None else keep.to(device)
    weight = (torch.randn((case.c, 1, case.k, case.k, case.k), generator=g) / case.k**1.5).to(device)
    bias = torch.randn((case.c,), generator=g).to(device) if case.bias else None
    return x, keep, weight, bias


def check_depthwise(case: DWCase, source: torch.Tensor, device: str = "cpu") -> dict:
    """Fused masked depthwise conv vs its reference (fp64 on the same inputs): output, and gradients w.r.t.
    x, weight and bias."""
    from . import depthwise as DW

    x0, keep, w0, b0 = dw_inputs(case, source, device)
    g = torch.Generator().manual_seed(_seed(case.name) + 1)
    upstream = torch.randn(x0.shape, generator=g).to(device=device, dtype=x0.dtype)
    x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    b = None if b0 is None else b0.clone().requires_grad_(True)
    got = DW.fused(x, keep, w, b)
    (got.float() * upstream.float()).sum().backward()
    xr, wr = x0.double().requires_grad_(True), w0.double().requires_grad_(True)
    br = None if b0 is None else b0.double().requires_grad_(True)
    want = DW.reference(xr, None if keep is None else keep.double(), wr, br)
    (want * upstream.double()).sum().backward()
    if got.dtype != x0.dtype:
        raise AssertionError(f"[{case.name}] output dtype {got.dtype} != input dtype {x0.dtype}")
    tol = _DW_TOL[case.dtype]
    gtol = 1e-3 if case.n * math.prod(case.shape) > 100_000 else 1e-4
    out = {"err_out": _assert_close(case.name, "output", got.double(), want, 0.0, tol),
           "err_grad_x": _assert_close(case.name, "grad x", x.grad.double(), xr.grad, 0.0, tol),
           "err_grad_w": _assert_close(case.name, "grad weight", w.grad.double(), wr.grad, 1e-6, gtol)}
    if b is not None:
        out["err_grad_b"] = _assert_close(case.name, "grad bias", b.grad.double(), br.grad, 1e-6, gtol)
    if case.keep == "all" and float(x.grad.abs().max()) != 0.0:
        raise AssertionError(f"[{case.name}] everything masked, yet a non-zero input gradient")
    return out


# ---------------------------------------------------------------------------------------------------
# Command line: the GPU self-check
# ---------------------------------------------------------------------------------------------------


def run_all(device: str, source: torch.Tensor, big: bool) -> list[dict]:
    """Every case on ``device``; returns one record per case (``ok`` False with the error on a mismatch)."""
    plan = [("mse", c, lambda c: check_mse(c, source, device)) for c in MSE_CASES + (MSE_CASES_BIG if big else [])]
    tokens = TOKEN_CASES + (TOKEN_CASES_BIG if big else [])
    plan += [("gather", c, lambda c: check_gather(c, device)) for c in tokens]
    plan += [("scatter", c, lambda c: check_scatter(c, device)) for c in tokens if not c.duplicates]
    plan += [("views", c, lambda c: check_views(c, source, device))
             for c in VIEW_CASES + (VIEW_CASES_BIG if big else [])]
    plan += [("depthwise", c, lambda c: check_depthwise(c, source, device))
             for c in DW_CASES + (DW_CASES_BIG if big else [])]
    records = []
    for kernel, case, fn in plan:
        t0 = time.perf_counter()
        try:
            rec = {"kernel": kernel, "case": case.name, "ok": True, **fn(case)}
        except AssertionError as exc:
            rec = {"kernel": kernel, "case": case.name, "ok": False, "error": str(exc)}
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["params"] = asdict(case)
        records.append(rec)
        status = "ok  " if rec["ok"] else "FAIL"
        detail = rec.get("error") or ", ".join(f"{k}={v:.2e}" for k, v in rec.items()
                                               if k.startswith("err_") and isinstance(v, float))
        print(f"{status} {kernel:9s} {case.name:28s} {rec['seconds']:7.2f}s  {detail}", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mim_scale.ops.parity",
                                 description="Check every Triton kernel against its torch reference.")
    ap.add_argument("--device", default="cuda", help="cuda (compiled kernels) or cpu (Triton interpreter)")
    ap.add_argument("--ct", default=None, help="NIfTI CT to cut crops from (default: "
                    "$MIM_SCALE_SAMPLE_DATA/abdomen_pelvis_ct.nii.gz, else a synthetic volume)")
    ap.add_argument("--big", action="store_true", help="add full-size cases (96^3 views, 192^3 crops)")
    ap.add_argument("--json", default=None, help="write the records here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    ct = args.ct or (Path(os.environ["MIM_SCALE_SAMPLE_DATA"]) / "abdomen_pelvis_ct.nii.gz"
                     if os.environ.get("MIM_SCALE_SAMPLE_DATA") else None)
    source, source_name = None, "synthetic (no CT file at hand)"
    if ct is not None and Path(ct).exists():
        try:
            source, source_name = load_ct_source(ct), str(ct)
        except ValueError as exc:  # e.g. no nibabel on a bare GPU machine: still check, on synthetic data
            source_name = f"synthetic ({exc})"
    if source is None:
        source = synthetic_source()
    print(f"parity on {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
          f"source: {source_name}, torch {torch.__version__}", flush=True)
    records = run_all(args.device, source, args.big)
    failed = [r for r in records if not r["ok"]]
    print(f"{len(records) - len(failed)}/{len(records)} cases passed", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "source": source_name, "records": records},
                                              indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
