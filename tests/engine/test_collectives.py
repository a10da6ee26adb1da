"""The loop's collectives: the device placement rule (NCCL -> the engine's CUDA device, gloo -> CPU) and the CPU
path on a real two-process gloo group. The NCCL path itself runs on a lent GPU (gpu/run_all.sh, train_check)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from mim_scale.engine.collectives import agree_max, collective_device, sum_over_ranks


@pytest.mark.parametrize("backend, engine, expected", [
    ("nccl", "cuda:0", "cuda:0"),
    ("nccl", "cuda:3", "cuda:3"),  # the engine's own card, not cuda:0 / a guess from the rank
    ("gloo", "cuda:1", "cpu"),  # gloo's CUDA path is partial: reduce on the host
    ("gloo", "cpu", "cpu"),
    ("mpi", "cuda:0", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda:2", "cuda:2"),  # a mixed group picks its backend by the tensor's device
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    (None, "cuda:0", "cuda:0"),  # no group: nothing is reduced, the tensor stays where the engine is
])
def test_placement_rule(backend, engine, expected):
    assert collective_device(backend, torch.device(engine)) == torch.device(expected)


def test_nccl_on_a_cpu_engine_is_refused():
    with pytest.raises(RuntimeError, match="NCCL process group serves CUDA tensors only"):
        collective_device("nccl", torch.device("cpu"))


def test_without_a_group_values_come_back():
    assert agree_max([0.0, 1.0], torch.device("cpu")) == [0.0, 1.0]
    assert sum_over_ranks([2, 3.5], torch.device("cpu")) == [2.0, 3.5]


def _worker(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # the engine device named here is a CUDA one: under gloo the rule still reduces on the host
        engine = torch.device("cuda", 0)
        flags = agree_max([float(rank == 1), 0.0, float(rank == 0)], engine)
        sums = sum_over_ranks([rank + 1, 10 * rank, 0.5], engine)
        out.put((rank, flags, sums))
    finally:
        dist.destroy_process_group()


def test_cpu_path_on_a_gloo_group():
    from mim_scale.engine.local import free_port

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = dict((r, (f, s)) for r, f, s in (out.get() for _ in range(2)))
    for rank in (0, 1):
        assert got[rank] == ([1.0, 0.0, 1.0], [3.0, 10.0, 1.0])
