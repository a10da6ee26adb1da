"""The small collectives the training loop issues itself, on the device the process group serves.

A pure NCCL group (``TorchConfig(backend="nccl")`` in the launcher, :func:`~mim_scale.engine.deepspeed_engine.
init_distributed` with a GPU) all-reduces CUDA tensors only: a CPU tensor makes the first step fail. Gloo serves
CPU tensors (its CUDA support is partial and slow). A mixed group (``"cpu:gloo,cuda:nccl"``) serves both and
picks by the tensor. :func:`collective_device` is the one place that rule lives; every collective the loop,
validation and checkpointing issue outside DeepSpeed goes through the helpers below. DeepSpeed's own
collectives (ZeRO gathers, ``safe_get_full_*`` in :mod:`mim_scale.engine.full_state`, ``GatheredParameters``)
act on the parameters, which already live on the engine's device; the differentiable SyncBatchNorm
all-reduce acts on activations, also on the engine's device.

Every function here is a collective when a process group is up: every rank calls it at the same point.
Without a group they return their input (one process).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def group_backend() -> str | None:
    """The default process group's backend string (``"nccl"``, ``"gloo"``, ``"cpu:gloo,cuda:nccl"``), or None
    when no group is up."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return str(dist.get_backend())


def collective_device(backend: str | None, engine_device: torch.device) -> torch.device:
    """Where a tensor must live for ``backend`` to reduce it, given the engine's device.

    - ``nccl``: the engine's CUDA device (an NCCL group on a CPU engine is a launcher error: raised);
    - ``gloo`` (and other CPU backends: ``mpi``, ``ucc``): CPU, whatever the engine's device;
    - a mixed group (``"cpu:gloo,cuda:nccl"``) or no group: the engine's device.
    """
    engine_device = torch.device(engine_device)
    if backend is None or "," in backend or ":" in backend:
        return engine_device
    if backend == "nccl":
        if engine_device.type != "cuda":
            raise RuntimeError(f"an NCCL process group serves CUDA tensors only, but the engine runs on "
                               f"{engine_device}: start the group with gloo (launch.use_gpu=false) or train on a GPU")
        return engine_device
    return torch.device("cpu")


def _reduce(values: Sequence[float], engine_device: torch.device, op) -> list[float]:
    backend = group_backend()
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=collective_device(backend, engine_device))
    if backend is not None:
        dist.all_reduce(t, op=op)
    return t.tolist()


def agree_max(flags: Sequence[float], engine_device: torch.device) -> list[float]:
    """Element-wise MAX over ranks: a flag any rank raised (a signal, a timer, a non-finite loss) is seen by all."""
    return _reduce(flags, engine_device, dist.ReduceOp.MAX if dist.is_available() else None)


def sum_over_ranks(values: Sequence[float], engine_device: torch.device) -> list[float]:
    """Element-wise SUM over ranks (counts of tokens, views, volumes, corrupt samples)."""
    return _reduce(values, engine_device, dist.ReduceOp.SUM if dist.is_available() else None)


def barrier(engine_device: torch.device | None = None) -> None:
    """Wait for every rank. Under NCCL the barrier runs on the engine's CUDA device (``device_ids``), so it
    never guesses a device from the rank number (a wrong guess hangs on a node with several GPUs)."""
    backend = group_backend()
    if backend is None:
        return
    if backend == "nccl" and engine_device is not None and torch.device(engine_device).type == "cuda":
        index = torch.device(engine_device).index
        dist.barrier(device_ids=[index if index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()
