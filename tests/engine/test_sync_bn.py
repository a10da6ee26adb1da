"""Synchronised BatchNorm on 2 gloo ranks gives what one rank gives on the concatenated batch: the output,
the input gradients and the running statistics."""

from __future__ import annotations

import json
import os

import torch
import torch.multiprocessing as mp
from torch import nn

from mim_scale.engine.local import free_port
from mim_scale.engine.sync_bn import SyncBatchNorm1d, convert_sync_batchnorm


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, 6, generator=g, dtype=torch.float64) * 3 + 1, torch.randn(10, 6, generator=g, dtype=torch.float64)


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, w = _batch()
    rows = slice(0, 3) if rank == 0 else slice(3, 10)  # unequal shares: the counts are summed too
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(6, affine=True)).double())[0]
    assert isinstance(bn, SyncBatchNorm1d)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 6))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    xs = x[rows].clone().requires_grad_(True)
    y = bn(xs)
    (y * w[rows]).sum().backward()
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump({"y": y.tolist(), "grad": xs.grad.tolist(), "running_mean": bn.running_mean.tolist(),
                   "running_var": bn.running_var.tolist(), "weight_grad": bn.weight.grad.tolist()}, f)
    dist.barrier()  # neither rank tears the group down while the other still talks to it (gloo aborts then)
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_rank, args=(free_port(), out), nprocs=2)
    ranks = [json.loads(open(f"{out}-{r}.json").read()) for r in (0, 1)]
    x, w = _batch()
    ref = nn.BatchNorm1d(6).double()
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2.0, 6))
        ref.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    (y * w).sum().backward()
    torch.testing.assert_close(torch.tensor(ranks[0]["y"] + ranks[1]["y"], dtype=torch.float64), y.detach())
    torch.testing.assert_close(torch.tensor(ranks[0]["grad"] + ranks[1]["grad"], dtype=torch.float64), xr.grad)
    for r in ranks:  # same running statistics on both ranks, equal to the single-rank module's
        torch.testing.assert_close(torch.tensor(r["running_mean"], dtype=torch.float64), ref.running_mean)
        torch.testing.assert_close(torch.tensor(r["running_var"], dtype=torch.float64), ref.running_var)
    # each rank's weight gradient is its share; their sum (what data parallelism all-reduces) is the whole
    torch.testing.assert_close(torch.tensor(ranks[0]["weight_grad"]) + torch.tensor(ranks[1]["weight_grad"]),
                               ref.weight.grad.float(), rtol=1e-5, atol=1e-6)


def test_single_process_and_eval_mode_match_torch():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    ref = nn.BatchNorm1d(8, affine=False)
    sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(8, affine=False)))[0]
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)
    sync.eval(), ref.eval()
    torch.testing.assert_close(sync(x + 1), ref(x + 1))
    # bf16 features are normalised in float32 and returned in bf16
    assert sync(x.bfloat16()).dtype == torch.bfloat16
