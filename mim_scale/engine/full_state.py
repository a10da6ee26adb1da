"""Layout-free training state: full fp32 master weights and AdamW moments, one tensor per parameter.

Why. DeepSpeed's own checkpoint is exact only on the layout that wrote it (its ZeRO partitions are
flat slices cut for that many ranks), and its files are pickles. Beside it every checkpoint carries
``full_state.safetensors`` with, for each parameter name ``n``:

    param/n        fp32 master weights (the optimizer's copy, not the bf16/fp16 module weights)
    exp_avg/n      AdamW first moment, fp32
    exp_avg_sq/n   AdamW second moment, fp32

and the optimizer step count in the safetensors metadata. This is the *consolidate-and-reshard* way of
resuming on another worker count (chosen over ``ds_to_universal``, which expects Megatron-style
``universal_checkpoint_info`` in the model states and pickled shards): gather with DeepSpeed's
``safe_get_full_*`` (ZeRO 1-3 and DeepSpeed's BF16_Optimizer; without ZeRO, bf16 runs use DeepSpeed's
FP16_Optimizer whose flat fp32 masters are read directly), and after building the engine on the
new layout, scatter with ``safe_set_full_*``. It is also the fp32 export source for every ZeRO stage,
read with no unpickling. Cost: rank 0 writes 12 bytes per parameter per checkpoint.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

FILE = "full_state.safetensors"
FORMAT = "mim-scale-full-state-1"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and isinstance(getattr(opt, "optimizer"), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _optimizer_step(engine) -> int:
    opt = _base_optimizer(engine)
    steps = [int(float(s["step"])) for s in opt.state.values() if "step" in s]
    steps += [int(g["step"]) for g in opt.param_groups if "step" in g]
    return max(steps, default=0)


def _ensure_moments(engine, step: int) -> None:
    """Create AdamW state where the optimizer has not taken a step yet (states are created lazily)."""
    opt = _base_optimizer(engine)
    for group in opt.param_groups:
        if "step" in group:  # DeepSpeed's FusedAdam counts steps per group
            group["step"] = step
        for p in group["params"]:
            _zero_moments(opt.state[p], p, step if "step" not in group else None, set_step=True)
    # ZeRO-3 hands the optimizer its flat fp32 partitions only inside step() (param_groups are empty between
    # steps), and keys the optimizer state by those flats: create the state there.
    for flat in getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or []:
        _zero_moments(opt.state[flat], flat, step)


def _zero_moments(state: dict, like: torch.Tensor, step: int | None, set_step: bool = False) -> None:
    """Zero AdamW moments shaped like ``like`` where ``state`` has none; the per-tensor ``step`` where it has none,
    or always with ``set_step`` (``step`` None: the optimizer counts steps per group)."""
    for key in MOMENTS:
        if key not in state:
            state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    if step is not None and (set_step or "step" not in state):
        state["step"] = torch.tensor(float(step), dtype=torch.float32)


def _link_moments(engine) -> None:
    """Point DeepSpeed's per-parameter fragment maps at the optimizer's (lazily created) moment tensors."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _flat_masters(engine) -> dict[int, tuple[torch.Tensor, int]]:
    """DeepSpeed's FP16_Optimizer (also used for bf16 without ZeRO) keeps, per group, one flat fp32 master
    the module's low-precision params are views of in order: param id -> (flat master, offset)."""
    wrapper = engine.optimizer
    out = {}
    if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):  # FP16_UnfusedOptimizer
        for masters, params in zip(wrapper.fp32_groups, wrapper.fp16_groups):
            for master, p in zip(masters, params):
                out[id(p)] = (master.view(-1), 0)
        return out
    if not (hasattr(wrapper, "fp32_groups_flat") and hasattr(wrapper, "fp16_groups")):
        return {}
    for flat, params in zip(wrapper.fp32_groups_flat, wrapper.fp16_groups):
        offset = 0
        for p in params:
            out[id(p)] = (flat, offset)
            offset += p.numel()
    return out


def _state_of(opt: torch.optim.Optimizer, flat: torch.Tensor) -> dict:
    """Optimizer state of a master (``flat`` may be a view of the tensor the optimizer steps)."""
    for p, state in opt.state.items():
        if p is flat or (p.data_ptr() == flat.data_ptr() and p.numel() == flat.numel()):
            return state
    return {}


def _flat_view(flat: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    return flat.narrow(0, offset, p.numel()).view(p.shape)


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a parameter (ZeRO-3 leaves ``p`` an empty shard and keeps it as ``ds_shape``)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _saved_buffers(engine) -> list[tuple[str, torch.Tensor]]:
    return [(name, b) for name, b in engine.module.named_buffers()
            if b is not None and (b.is_floating_point() or b.dtype in (torch.int64, torch.int32))]


def layout(engine) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(key, dtype, shape) of every tensor :func:`iter_state` yields, in the same order; known without any
    collective, so rank 0 can write the file header before the first gather."""
    out: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for name, p in _trainable(engine):
        out += [(f"{kind}/{name}", torch.float32, _shape(p)) for kind in ("param", *MOMENTS)]
    out += [(f"buffer/{name}", b.dtype, tuple(b.shape)) for name, b in _saved_buffers(engine)]
    return out


def iter_state(engine, step: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective: yields (key, full CPU tensor) in :func:`layout` order, one parameter's master and moments at a
    time, so no rank ever holds more than one full parameter's state (a ZeRO-3 rank otherwise holds 12 bytes
    per parameter of the whole model on top of its shards). Every rank must consume the whole iterator."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = _base_optimizer(engine)
    _ensure_moments(engine, step)  # zeros where no step has run yet, so every rank gathers the same keys
    _link_moments(engine)
    flats = _flat_masters(engine)
    for name, p in _trainable(engine):
        shape = _shape(p)
        master = safe_get_full_fp32_param(p)
        if id(p) in flats:
            flat, offset = flats[id(p)]
            master = _flat_view(flat, offset, p)
            state = _state_of(opt, flat)
            moments = {k: _flat_view(state[k].view(-1), offset, p) if k in state else torch.zeros_like(master)
                       for k in MOMENTS}
        elif master is None:  # no ZeRO, no low-precision optimizer: the module holds the masters
            master = p.detach()
            moments = {k: opt.state.get(p, {}).get(k, torch.zeros_like(p)) for k in MOMENTS}
        else:
            # collective per call: never skipped on one rank only (moments exist, see _ensure_moments)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        yield f"param/{name}", master.detach().float().cpu().contiguous().reshape(shape)
        for k, v in moments.items():
            yield f"{k}/{name}", v.detach().float().cpu().contiguous().reshape(shape)
        del master, moments
    for name, b in _saved_buffers(engine):
        yield f"buffer/{name}", b.detach().cpu().contiguous()


def gather(engine) -> tuple[dict[str, torch.Tensor], int]:
    """Collective: every rank gets (tensors as in the module doc, optimizer step), all at once. For tests and
    small models; :func:`save` streams instead."""
    step = _optimizer_step(engine)
    return {key: t.clone() for key, t in iter_state(engine, step)}, step


# safetensors' dtype names (https://github.com/huggingface/safetensors: the header's "dtype" field)
_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32"}


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """A safetensors header for ``entries`` laid out back to back in that order (8-byte aligned, space-padded)."""
    import json

    table: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        table[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def save(engine, ckpt_dir: Path, rank: int) -> None:
    """Collective: gather one parameter at a time; rank 0 streams each into ``full_state.safetensors``.

    Peak memory on any rank: one parameter's master and moments (12 bytes x its size), not the model's.
    """
    step = _optimizer_step(engine)
    entries = layout(engine)
    final = Path(ckpt_dir) / FILE
    tmp = Path(ckpt_dir) / f".{FILE}.tmp"
    out = open(tmp, "wb") if rank == 0 else None
    try:
        if out is not None:
            out.write(_header(entries, {"optimizer_step": str(step), "format": FORMAT}))
        for (key, tensor), (want, dtype, shape) in zip(iter_state(engine, step), entries, strict=True):
            if out is None:
                continue
            if key != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise RuntimeError(f"full state: {key} {tensor.dtype} {tuple(tensor.shape)} does not match the "
                                   f"header's {want} {dtype} {shape}")
            out.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    if rank == 0:
        tmp.replace(final)


class _Reader:
    """A verified ``full_state.safetensors``, read one tensor at a time (memory-mapped: nothing is loaded
    until asked for, nothing is unpickled)."""

    def __init__(self, ckpt_dir: Path):
        from safetensors import safe_open

        self.path = Path(ckpt_dir) / FILE
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: missing (checkpoints written before full-state saving cannot "
                                    "be resharded)")
        self._file = None
        try:
            self._file = safe_open(str(self.path), framework="pt")  # a JSON header and raw tensors
            self._f = self._file.__enter__()
            meta = self._f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r} is not {FORMAT!r}")
            self.step = int(meta.get("optimizer_step", 0))
            self._keys = set(self._f.keys())
            if self.step < 0:
                raise ValueError(f"negative optimizer step {self.step}")
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors do not name the file
            if self._file is not None:
                self._file.__exit__(None, None, None)
            raise ValueError(f"{self.path}: not a readable full state ({type(exc).__name__}: {exc})") from exc

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        self._file.__exit__(None, None, None)

    def keys(self) -> set[str]:
        return set(self._keys)

    def spec(self, key: str) -> tuple[str, tuple[int, ...]] | None:
        """(safetensors dtype name, shape) of ``key`` without reading it; None if absent."""
        if key not in self._keys:
            return None
        sl = self._f.get_slice(key)
        return sl.get_dtype(), tuple(sl.get_shape())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(key)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{self.path}: {key} unreadable ({type(exc).__name__}: {exc})") from exc


def read(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of the full state (loaded whole) and the optimizer step."""
    with _Reader(ckpt_dir) as r:
        return {key: r.get(key) for key in sorted(r.keys())}, r.step


def master_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The module's state dict with fp32 master weights (floating buffers cast to fp32)."""
    tensors, _ = read(ckpt_dir)
    out = {}
    for key, v in tensors.items():
        kind, _, name = key.partition("/")
        if kind == "param":
            out[name] = v
        elif kind == "buffer":
            out[name] = v.float() if v.is_floating_point() else v
    return out


def restore(engine, ckpt_dir: Path) -> int:
    """Collective: load masters and moments into an engine of any layout; returns the optimizer step.

    The file is read one parameter at a time (every rank maps the same file), so a rank never holds more
    than one full parameter's state besides its own shards. The module (low-precision) weights are set to
    the masters cast down, which is what every DeepSpeed optimizer holds after a step.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    with _Reader(ckpt_dir) as reader:
        step = reader.step
        _ensure_moments(engine, step)
        _link_moments(engine)
        opt = _base_optimizer(engine)
        params = _trainable(engine)
        missing = sorted(n for n, _ in params if reader.spec(f"param/{n}") is None)
        if missing:
            raise ValueError(f"{reader.path}: no saved state for parameters {missing[:5]} (model changed?)")
        for name, p in params:  # copy_ would broadcast a wrongly shaped tensor: check every one first
            shape = _shape(p)
            for kind in ("param", *MOMENTS):
                spec = reader.spec(f"{kind}/{name}")
                if spec != ("F32", shape):
                    raise ValueError(f"{reader.path}: {kind}/{name} is {spec}, expected ('F32', {shape})")
        flats = _flat_masters(engine)
        for name, p in params:
            master = reader.get(f"param/{name}")
            if id(p) in flats:
                flat, offset = flats[id(p)]
                with torch.no_grad():
                    _flat_view(flat, offset, p).copy_(master)
                    state = _state_of(opt, flat)
                    for k in MOMENTS:
                        _flat_view(state[k].view(-1), offset, p).copy_(reader.get(f"{k}/{name}"))
            elif hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                device = p.ds_tensor.device if hasattr(p, "ds_tensor") else p.device
                safe_set_full_fp32_param(p, master.to(device))
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, reader.get(f"{k}/{name}").to(device), k)
            else:
                state = opt.state[p]
                for k in MOMENTS:
                    state[k] = reader.get(f"{k}/{name}").to(p.device).clone()
            if hasattr(p, "ds_id"):  # ZeRO-3: the module weight is partitioned; gather, set, re-partition
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if torch.distributed.get_rank() == 0:
                        p.data.copy_(master.to(p.dtype))
            else:
                with torch.no_grad():
                    p.data.copy_(master.to(device=p.device, dtype=p.dtype))
            del master
        _restore_buffers(engine.module, {f"buffer/{n}": reader.get(f"buffer/{n}")
                                         for n, _ in engine.module.named_buffers() if f"buffer/{n}" in reader.keys()})
    return step


def _restore_buffers(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Buffers saved beside the parameters (BatchNorm running statistics and counts) back into ``module``; a
    buffer the file lacks keeps its value (checkpoints from before the model had it)."""
    for name, b in module.named_buffers():
        t = tensors.get(f"buffer/{name}")
        if b is None or t is None:
            continue
        if tuple(t.shape) != tuple(b.shape):
            raise ValueError(f"buffer/{name} is {tuple(t.shape)} in the full state, the model has {tuple(b.shape)}")
        with torch.no_grad():
            b.copy_(t.to(device=b.device, dtype=b.dtype))
