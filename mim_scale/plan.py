"""``mim-scale plan``: what a pre-training run will do and cost, before it starts.

    mim-scale plan --config base --workers 8 --use-gpu --volumes 10000
    mim-scale plan --config data_10k --workers 16,32 --use-gpu --json

The recipe (batch, accumulation, lr, schedule) comes from :mod:`mim_scale.recipe`, the same code every worker
resolves at start (and records as ``RUN/recipe.json``), so the plan and the run cannot disagree. Around it:
tokens and training FLOPs (the analytic count the engine uses for MFU), analytic memory per worker, the
storage read rate per node, and the wall time and device-hours projected from the throughput this project
has measured for that size and device (``mim_scale/configs/throughput.json``, the measurement named; "not
measured" when there is none).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from mim_scale.config import SHIPPED_CONFIGS, Config, load_config
from mim_scale.errors import UserFacingError
from mim_scale.recipe import Recipe, allowed_worker_counts, resolve

# Without a manifest to read the volume size from: a 350 x 350 x 300 mm CT at 1.5 mm, int16 (an assumption,
# said so in the output).
ASSUMED_VOLUME_BYTES = 2 * (350 // 1.5) ** 2 * (300 // 1.5)
GIB = 2**30


@dataclass(frozen=True)
class Plan:
    config: str
    size: str | None  # the shipped model size whose model section this config has
    recipe: Recipe
    allowed_workers: list[int]  # worker counts (1..max(64, workers)) that keep the global batch
    elastic_range: tuple[int, int]
    views_per_crop: int
    tokens_per_crop: int  # visible tokens through the encoder's transformer, all levels
    flops_per_crop: float  # training FLOPs (3 x forward), the engine's MFU count
    params: int
    zero_stage: int
    model_state_gib_per_worker: float  # weights + grads + optimizer state under the config's ZeRO stage
    activation_gib_per_worker: float  # saved activations for one micro-batch
    volume_bytes: float
    volume_bytes_source: str
    device: str
    throughput: dict[str, Any] | None  # the measurement the projection uses
    workers_per_node: int

    # -- derived figures ----------------------------------------------------------------------------------

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_crop * self.recipe.crops_per_step

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_crop * self.recipe.crops_per_step

    @property
    def flops_total(self) -> float | None:
        return self.flops_per_step * self.recipe.total_steps if self.recipe.total_steps else None

    @property
    def crops_per_s(self) -> float | None:
        """Projected crops per second of the whole group."""
        return self.throughput["crops_per_s"] * self.recipe.workers if self.throughput else None

    @property
    def wall_hours(self) -> float | None:
        rate, steps = self.crops_per_s, self.recipe.total_steps
        return steps * self.recipe.crops_per_step / rate / 3600 if rate and steps else None

    @property
    def device_hours(self) -> float | None:
        return self.wall_hours * self.recipe.workers if self.wall_hours is not None else None

    @property
    def read_bytes_per_s_per_node(self) -> float | None:
        """Storage read rate a node needs at the projected rate: each volume read is the whole volume."""
        if not self.throughput:
            return None
        volumes_per_s_per_worker = self.throughput["crops_per_s"] / self.recipe.crops_per_volume
        return volumes_per_s_per_worker * min(self.workers_per_node, self.recipe.workers) * self.volume_bytes

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update({k: getattr(self, k) for k in ("tokens_per_step", "flops_per_step", "flops_total", "crops_per_s",
                                                  "wall_hours", "device_hours", "read_bytes_per_s_per_node")})
        return out


def size_of(cfg: Config) -> str | None:
    """The shipped size (tiny, base, large, huge) whose model section ``cfg`` has, if any."""
    for name in SHIPPED_CONFIGS:
        if load_config(name).model == cfg.model:
            return name
    return None


def measurements() -> list[dict[str, Any]]:
    text = resources.files("mim_scale.configs").joinpath("throughput.json").read_text()
    return list(json.loads(text)["measurements"])


def find_measurement(size: str | None, device: str) -> dict[str, Any] | None:
    """The latest measurement for ``size`` on a device whose name contains ``device`` (case-insensitive)."""
    found = [m for m in measurements() if m["size"] == size and device.lower() in m["device"].lower()]
    return max(found, key=lambda m: m.get("date", "")) if found else None


def make_plan(cfg: Config, *, workers: int | None = None, training_volumes: int | None = None,
              device: str | None = None, workers_per_node: int | None = None) -> Plan:
    """The plan of ``cfg`` on ``workers`` (default ``launch.workers``). ``training_volumes`` defaults to the
    count in ``data.shards``' manifest when one is configured; ``device`` (a substring of the device name, e.g.
    "H100") defaults to "H200" on GPU and "cpu" otherwise."""
    from mim_scale.model.flops import flops_per_sample, level_plan
    from mim_scale.model.memory import analytic_memory, model_state_bytes_per_worker

    workers = workers or cfg.launch.workers
    try:
        shards = _shard_list(cfg)
    except UserFacingError:
        if training_volumes is None:
            raise
        shards = None  # planning before the shards exist: the volume count is given, sizes are assumed
    if training_volumes is None and shards is not None:
        training_volumes = sum(s.samples for s in shards)
    recipe = resolve(cfg, workers, training_volumes, need_steps=False)
    lo = cfg.launch.min_workers or workers
    levels = level_plan(cfg)
    mem = analytic_memory(cfg, cfg.train.precision, cfg.train.micro_batch)
    volume_bytes, source = _volume_bytes(shards)
    device = device or ("H200" if cfg.launch.use_gpu else "cpu")
    size = size_of(cfg)
    return Plan(config=cfg.name, size=size, recipe=recipe,
                allowed_workers=allowed_worker_counts(cfg, 1, max(64, workers)), elastic_range=(lo, workers),
                views_per_crop=sum(n for _, n, _ in levels), tokens_per_crop=sum(n * k for _, n, k in levels),
                flops_per_crop=flops_per_sample(cfg), params=int(mem["params"]), zero_stage=cfg.train.zero_stage,
                model_state_gib_per_worker=model_state_bytes_per_worker(mem["params"], cfg.train.zero_stage,
                                                                        workers) / GIB,
                activation_gib_per_worker=mem["activation_bytes"] / GIB, volume_bytes=volume_bytes,
                volume_bytes_source=source, device=device, throughput=find_measurement(size, device),
                workers_per_node=workers_per_node or (8 if cfg.launch.use_gpu else workers))


def _shard_list(cfg: Config):
    if not cfg.data.shards:
        return None
    from mim_scale.data.stream import manifest_shards

    return manifest_shards(cfg.data)


def _volume_bytes(shards) -> tuple[float, str]:
    sizes = [(getattr(s, "bytes", 0) or 0, s.samples) for s in shards or []]
    if sizes and all(b > 0 for b, _ in sizes):
        return sum(b for b, _ in sizes) / sum(n for _, n in sizes), "mean volume in the manifest"
    return ASSUMED_VOLUME_BYTES, "assumed: a 350x350x300 mm CT at 1.5 mm, int16 (no manifest sizes)"


def format_plan(plan: Plan) -> str:
    """The plan as the terminal shows it."""
    r = plan.recipe
    lo, hi = plan.elastic_range
    in_range = [w for w in plan.allowed_workers if lo <= w <= hi]
    lines = [f"plan: config {plan.config or '?'} (model size {plan.size or 'custom'}, {plan.params / 1e6:.1f}M parameters)",
             f"  workers              {r.workers}" + (f" (elastic {lo}..{hi}: {_counts(in_range)} keep the batch)"
                                                       if lo != hi else ""),
             f"  batch                {r.micro_batch_crops} crop(s) per worker x {r.grad_accum} accumulation x "
             f"{r.workers} workers = {r.crops_per_step} crops per step",
             f"                       {r.volumes_per_step:g} volume reads per step ({r.crops_per_volume} crop(s) per read)",
             f"  worker counts that keep {r.crops_per_step} crops: {_counts(plan.allowed_workers)}",
             f"  peak lr              {r.peak_lr:.3g} ({r.lr_rule})",
             _schedule_line(r),
             f"  tokens               {plan.tokens_per_crop} per crop ({plan.views_per_crop} views), "
             f"{plan.tokens_per_step:,} per step" + (f", {plan.tokens_per_step * r.total_steps:.3g} in all"
                                                     if r.total_steps else ""),
             f"  training FLOPs       {plan.flops_per_crop / 1e12:.3g} TFLOP per crop, {plan.flops_per_step / 1e12:.3g} "
             f"per step" + (f", {plan.flops_total / 1e18:.3g} EFLOP in all" if plan.flops_total else ""),
             f"  memory per worker    {plan.model_state_gib_per_worker:.2f} GiB weights+grads+optimizer "
             f"(ZeRO-{plan.zero_stage}) + {plan.activation_gib_per_worker:.2f} GiB activations (analytic)"]
    m = plan.throughput
    if m is None:
        lines.append(f"  throughput           not measured for {plan.size or 'this size'} on {plan.device}: "
                     "no projection (measure with gpu/run_all.sh; results go to mim_scale/configs/throughput.json)")
    else:
        lines += [f"  throughput           {m['crops_per_s']:g} crops/s per device, measured on {m['device']} "
                  f"({m['date']}, {m['path']}; {m['source']})",
                  (f"  projected            {plan.wall_hours:,.1f} h wall on {r.workers} workers = "
                   f"{plan.device_hours:,.0f} device-hours" if plan.wall_hours is not None else
                   "  projected            needs the step count: pass --volumes N or set data.shards"),
                  f"  storage reads        {plan.read_bytes_per_s_per_node / 2**20:,.1f} MiB/s per node of "
                  f"{min(plan.workers_per_node, r.workers)} workers ({plan.volume_bytes / 2**20:.1f} MiB per volume, "
                  f"{plan.volume_bytes_source})"]
    return "\n".join(lines)


def _schedule_line(r: Recipe) -> str:
    head = "  schedule             "
    if r.total_steps is None:
        return (head + "steps derive from the epochs and the training set's volume count (unknown here: pass "
                "--volumes N or set data.shards): " + f"{r.volumes_per_step:g} volume reads per step")
    line = head + f"{r.warmup_steps} warm-up + {r.total_steps - r.warmup_steps} cosine = {r.total_steps} steps"
    if r.epochs:
        return line + (f" = {r.epochs:.1f} epochs of {r.training_volumes} volumes "
                       f"({r.steps_per_epoch:.1f} steps per epoch)")
    return line


def _counts(counts: list[int]) -> str:
    return ", ".join(map(str, counts)) if counts else "none"

