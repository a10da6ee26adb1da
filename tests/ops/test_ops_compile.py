"""Every kernel compiles for Hopper (sm_90) through Triton's real compiler, down to a cubin, on a CPU machine.

The interpreter (test_ops_parity) checks what the kernels compute; this checks that the compiled path, which
only GPUs run, accepts them (typing of the branches, reductions, constexpr arithmetic) at production sizes.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from mim_scale.ops import depthwise, gather, loss, scatter, views  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a triton without these cannot be checked this way
    pytest.skip("this triton has no ASTSource/GPUTarget", allow_module_level=True)

HOPPER = GPUTarget("cuda", 90, 32)

# one body for both passes: the forward writes fp32 per-token errors, the backward the gradient in pred's dtype
MSE = {"pred_ptr": "*bf16", "vol_ptr": "*fp32", "mask_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32",
       "L": "i32", "GH": "i32", "GW": "i32", "s_n": "i32", "s_c": "i32", "s_d": "i32", "s_h": "i32", "eps": "fp32",
       "C": "constexpr", "P": "constexpr", "E": "constexpr", "BLOCK": "constexpr", "NCHUNK": "constexpr",
       "BACKWARD": "constexpr"}
MSE_BWD = {**MSE, "out_ptr": "*bf16"}
VIEWS = {"crop_ptr": "*bf16", "out_ptr": "*bf16", "oct_ptr": "*i64", "pick_ptr": "*i64", "mask_ptr": "*fp32",
         "N": "i32", "K2": "i32", "K3": "i32", "scale": "fp32", "C": "constexpr", "S": "constexpr", "P": "constexpr",
         "HAS_MASK": "constexpr", "BLOCK": "constexpr"}

DW_CONV = {"x_ptr": "*bf16", "keep_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*bf16",
           "NS": "i32", "D": "i32", "H": "i32", "W": "i32", "C": "i32", "K": "constexpr", "HAS_KEEP": "constexpr",
           "KEEP_OUT": "constexpr", "HAS_BIAS": "constexpr", "FLIP": "constexpr", "BLOCK_S": "constexpr",
           "BLOCK_C": "constexpr"}
DW_WGRAD = {"x_ptr": "*bf16", "keep_ptr": "*bf16", "g_ptr": "*bf16", "part_ptr": "*fp32", "NS": "i32", "D": "i32",
            "H": "i32", "W": "i32", "C": "i32", "NBLK": "i32", "K": "constexpr", "HAS_KEEP": "constexpr",
            "BLOCK_S": "constexpr", "BLOCK_C": "constexpr"}
KERNEL_SETS = {"mse_fwd": loss.KERNELS, "mse_bwd": loss.KERNELS, "gather": gather.KERNELS,
               "gather_bwd": gather.KERNELS, "scatter": scatter.KERNELS, "fill_grad": scatter.KERNELS,
               "views": views.KERNELS, "dw_conv": depthwise.KERNELS, "dw_wgrad": depthwise.KERNELS}
KERNEL_NAMES = {"dw_conv": "conv", "dw_wgrad": "wgrad", "mse_fwd": "mse", "mse_bwd": "mse"}


def _mse_consts(c: int, d: int, p: int, backward: bool = False) -> dict:
    import torch

    meta = loss._mse_meta(torch.empty((1, c, d, d, d), device="meta"), p)
    return {**{k: meta[k] for k in ("C", "P", "E", "BLOCK", "NCHUNK")}, "BACKWARD": backward}


CASES = [
    ("mse_fwd", MSE, _mse_consts(1, 96, 16), 8),
    ("mse_fwd", MSE, _mse_consts(1, 96, 32), 8),  # chunked
    ("mse_bwd", MSE_BWD, _mse_consts(1, 96, 16, backward=True), 8),
    ("mse_bwd", MSE_BWD, _mse_consts(2, 96, 32, backward=True), 8),
    ("gather", {"x_ptr": "*bf16", "ids_ptr": "*i64", "out_ptr": "*bf16", "L": "i32", "K": "i32", "E": "i32",
                "BLOCK_E": "constexpr"}, {"BLOCK_E": 512}, 2),
    ("gather_bwd", {"g_ptr": "*bf16", "ids_ptr": "*i64", "out_ptr": "*fp32", "L": "i32", "K": "i32", "E": "i32",
                    "BLOCK_E": "constexpr"}, {"BLOCK_E": 512}, 2),
    ("scatter", {"vis_ptr": "*bf16", "inv_ptr": "*i32", "fill_ptr": "*bf16", "out_ptr": "*bf16", "L": "i32",
                 "K": "i32", "E": "i32", "BLOCK_E": "constexpr"}, {"BLOCK_E": 1024}, 4),
    ("fill_grad", {"g_ptr": "*bf16", "inv_ptr": "*i32", "part_ptr": "*fp32", "NL": "i32", "E": "i32",
                   "ROWS": "constexpr", "BLOCK_E": "constexpr"}, {"ROWS": 64, "BLOCK_E": 1024}, 4),
    ("views", VIEWS, {"C": 1, "S": 96, "P": 16, "HAS_MASK": False, "BLOCK": 1024}, 8),
    ("views", VIEWS, {"C": 2, "S": 48, "P": 8, "HAS_MASK": True, "BLOCK": 1024}, 8),
    ("dw_conv", DW_CONV, {"K": 5, "HAS_KEEP": True, "KEEP_OUT": False, "HAS_BIAS": True, "FLIP": False,
                          "BLOCK_S": depthwise.BLOCK_S, "BLOCK_C": 32}, 4),
    ("dw_conv", DW_CONV, {"K": 5, "HAS_KEEP": True, "KEEP_OUT": True, "HAS_BIAS": False, "FLIP": True,
                          "BLOCK_S": depthwise.BLOCK_S, "BLOCK_C": 32}, 4),  # the input gradient
    ("dw_wgrad", DW_WGRAD, {"K": 5, "HAS_KEEP": True, "BLOCK_S": depthwise.BLOCK_S, "BLOCK_C": 32}, 4),
]


@pytest.mark.parametrize("name, signature, constexprs, warps", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[2].items())}" for c in CASES])
def test_kernel_compiles_for_sm90(name, signature, constexprs, warps):
    fn = getattr(KERNEL_SETS[name].jitted(False), KERNEL_NAMES.get(name, name))
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER,
                              options={"num_warps": warps})
    assert compiled.asm.get("cubin"), f"{name}: no cubin produced"
    assert ".target sm_90" in compiled.asm["ptx"]
