"""One validated configuration tree for every entry point.

A config is a TOML file (or a shipped name: ``tiny``, ``base``, ``large``, ``huge``) loaded into typed,
frozen dataclasses, then overridden from the command line with ``--set section.key=value``. Every
problem (unknown key, wrong type, out-of-range value, inconsistent coupled sizes) raises
:class:`ConfigError` naming the dotted key, before any work starts.

Usage::

    cfg = load_config("tiny", overrides=["train.steps=20", "launch.workers=2"])
    cfg.model.patch_size   # 2 ** len(cfg.model.widths)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# ConfigError and apply_overrides are re-exported: callers catch and use them from here
from mim_scale.tomltree import ConfigError, TreeSource, apply_overrides, build_dataclass, choice, require  # noqa: F401

SHIPPED_CONFIGS = ("tiny", "base", "large", "huge")  # the model sizes; data recipes ship beside them


def shipped_names() -> list[str]:
    """Every pre-training config shipped in ``mim_scale/configs`` (fine-tuning recipes excluded)."""
    folder = resources.files("mim_scale.configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml") and not p.name.startswith("finetune_"))


@dataclass(frozen=True)
class DataConfig:
    """Where shards come from and how crops are cut from them."""

    shards: str = ""  # manifest.json path, a directory holding one, or a URL prefix
    crop_size: int = 192  # side of the cubic crop, voxels at the shard spacing
    crops_per_volume: int = 1  # random crops cut from each volume read (the published loader cuts one)
    hu_min: float = -1000.0  # intensity window, mapped linearly to [0, 1]
    hu_max: float = 1000.0
    shuffle_buffer: int = 8  # samples held for shuffling after decode
    num_workers: int = 1  # DataLoader worker processes per training worker
    seed: int = 0
    mixture: dict[str, float] = field(default_factory=dict)  # dataset name -> sampling weight
    # Shard URLs outside the manifest's own folder / S3 prefix (absolute paths, other buckets, pipe: commands,
    # http) are refused unless this is true: only for manifests you wrote or trust (a pipe: URL runs a shell).
    allow_external_shard_urls: bool = False
    validation_shards: str = ""  # manifest of held-out volumes (never trained on); "" = validate on training shards

    def check(self, model: "ModelConfig") -> None:
        require(self.crop_size == 2 * model.view_size, "data.crop_size",
                f"must be 2 x model.view_size = {2 * model.view_size} (level-2 views are the crop's octants), "
                f"got {self.crop_size}")
        require(self.crops_per_volume >= 1, "data.crops_per_volume", "must be >= 1")
        require(self.hu_max > self.hu_min, "data.hu_max", "must be greater than data.hu_min")
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        for name, w in self.mixture.items():
            require(w > 0 and math.isfinite(w), f"data.mixture.{name}", f"weight must be positive, got {w}")


@dataclass(frozen=True)
class ModelConfig:
    """The hybrid ConvMAE-style backbone (MIM_METHOD.md, 'Hybrid backbone').

    ``widths`` has one entry per encoder stage; the last stage is the transformer stage, the
    others are conv stages. The patch size is ``2 ** len(widths)``.
    """

    view_size: int = 96  # side of each masked view fed to the encoder
    in_channels: int = 1
    widths: tuple[int, ...] = (48, 96, 192, 384)
    conv_depths: tuple[int, ...] = (2, 2, 2)  # blocks per conv stage (len(widths) - 1 entries)
    conv_kernel: int = 5  # depthwise kernel of the conv blocks
    encoder_depth: int = 11  # transformer blocks in the last stage
    encoder_heads: int = 12
    decoder_dim: int = 576
    decoder_depth: int = 8
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    activation_checkpointing: bool = False

    @property
    def patch_size(self) -> int:
        return 2 ** len(self.widths)

    @property
    def grid(self) -> int:
        """Tokens per side of a view."""
        return self.view_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**3

    @property
    def embed_dim(self) -> int:
        return self.widths[-1]

    def check(self) -> None:
        w = self.widths
        require(len(w) >= 2, "model.widths", "needs at least one conv stage and the transformer stage")
        require(all(x > 0 for x in w), "model.widths", "widths must be positive")
        require(len(self.conv_depths) == len(w) - 1, "model.conv_depths",
                f"needs one entry per conv stage: {len(w) - 1} (len(model.widths) - 1), got {len(self.conv_depths)}")
        require(all(x >= 0 for x in self.conv_depths), "model.conv_depths", "depths must be >= 0")
        require(self.conv_kernel >= 1 and self.conv_kernel % 2 == 1, "model.conv_kernel", "must be a positive odd number")
        require(self.view_size > 0 and self.view_size % self.patch_size == 0, "model.view_size",
                f"must be divisible by the patch size {self.patch_size} (= 2 ** len(model.widths)), got {self.view_size}")
        require(self.grid % 2 == 0, "model.view_size",
                f"the token grid per side (view_size / patch_size = {self.grid}) must be even, to split into octants")
        require(self.in_channels >= 1, "model.in_channels", "must be >= 1")
        require(self.encoder_depth >= 1, "model.encoder_depth", "must be >= 1")
        require(self.encoder_heads >= 1 and self.embed_dim % self.encoder_heads == 0, "model.encoder_heads",
                f"must divide the transformer width model.widths[-1] = {self.embed_dim}")
        require(self.decoder_depth >= 1, "model.decoder_depth", "must be >= 1")
        require(self.decoder_heads >= 1 and self.decoder_dim % self.decoder_heads == 0, "model.decoder_heads",
                f"must divide model.decoder_dim = {self.decoder_dim}")
        require(self.mlp_ratio > 0, "model.mlp_ratio", "must be > 0")


@dataclass(frozen=True)
class MaskingConfig:
    """The three MiM levels (MIM_METHOD.md, 'One training sample')."""

    levels: int = 3  # 1 = plain MAE on the downsampled crop; 2 or 3 = MiM
    level1_ratio: float = 0.5  # fraction of the 8 octants masked whole
    level2_ratio: float = 0.6
    level3_ratio: float = 0.5
    level3_picks: int = 4  # masked level-2 patches turned into level-3 views, per level-2 view

    def check(self, model: ModelConfig) -> None:
        tokens = model.num_tokens
        require(self.levels in (1, 2, 3), "masking.levels", f"must be 1, 2 or 3, got {self.levels}")
        octants_masked = round(8 * self.level1_ratio)
        require(0 < self.level1_ratio < 1 and abs(octants_masked - 8 * self.level1_ratio) < 1e-9
                and 1 <= octants_masked <= 7, "masking.level1_ratio",
                f"must mask a whole number of the 8 octants (k/8, 1 <= k <= 7), got {self.level1_ratio}")
        for key, ratio in (("level2_ratio", self.level2_ratio), ("level3_ratio", self.level3_ratio)):
            require(0 < ratio < 1, f"masking.{key}", f"must be in (0, 1), got {ratio}")
            kept = math.floor(tokens * (1 - ratio))
            require(1 <= kept < tokens, f"masking.{key}",
                    f"keeps {kept} of {tokens} tokens; must keep at least one and mask at least one")
        require(self.levels == 1 or octants_masked >= 2, "masking.level1_ratio",
                "must mask at least 2 of the 8 octants when levels >= 2: the alignment MLPs normalise over the "
                f"level-2 views of each crop (BatchNorm needs >= 2), got {octants_masked}")
        masked_l2 = tokens - math.floor(tokens * (1 - self.level2_ratio))
        require(1 <= self.level3_picks <= masked_l2, "masking.level3_picks",
                f"must be between 1 and the masked tokens per level-2 view ({masked_l2}), got {self.level3_picks}")


@dataclass(frozen=True)
class LossConfig:
    rec_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # w1, w2, w3
    align_weights: tuple[float, ...] = (0.1, 0.1)  # a12, a23
    align_variant: str = "simsiam"  # "simsiam" (spec default) or "reference" (collapse-prone)
    schedule: str = "constant"  # "constant" or "sincos" (ramps coarse/fine weights over training)
    norm_pix_eps: float = 1e-6

    def check(self) -> None:
        require(len(self.rec_weights) == 3, "loss.rec_weights", "needs 3 entries (w1, w2, w3)")
        require(len(self.align_weights) == 2, "loss.align_weights", "needs 2 entries (a12, a23)")
        require(all(w >= 0 for w in self.rec_weights + self.align_weights), "loss.rec_weights", "weights must be >= 0")
        choice(self.align_variant, "loss.align_variant", ("simsiam", "reference"))
        choice(self.schedule, "loss.schedule", ("constant", "sincos"))
        require(self.norm_pix_eps > 0, "loss.norm_pix_eps", "must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe. Batch, lr and schedule resolve per worker count in :mod:`mim_scale.recipe`."""

    steps: int = 100  # optimizer steps; 0 = derive from ``epochs`` and the training manifest's volume count
    epochs: float = 0.0  # an epoch = as many volume reads as the training set has volumes
    warmup_epochs: float = 0.0  # > 0 derives warmup_steps from epochs
    micro_batch: int = 1  # crops per worker per micro-step
    global_batch_crops: int = 0  # crops per optimizer step, kept at any worker count; 0 = launch.workers x micro x accum
    grad_accum: int = 0  # micro-steps per optimizer step; 0 = derive (global_batch_crops / (workers x micro_batch))
    lr: float = 0.0  # peak lr; 0 = derive: base_lr x global_batch_crops / 256
    base_lr: float = 4e-4  # the published blr 1e-4 x its factor 4 for crops never cut (docs/MIM_METHOD.md): 2e-4 at 128
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "bf16"  # "fp32", "bf16", "fp16" (fp16 on GPU only)
    zero_stage: int = 2
    offload_optimizer: bool = False
    # glibc's mmap threshold in a CPU worker, MiB: -1 = auto (fixed under ZeRO-3, so the parameters it gathers
    # and frees go back to the system; glibc's dynamic default otherwise), 0 = glibc's default, N = fixed at N
    # (engine.deepspeed_engine.cpu_mmap_threshold_bytes). No effect on GPU workers.
    cpu_mmap_threshold_mib: float = -1.0
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50  # steps; 0 disables step-based saves
    checkpoint_minutes: float = 0.0  # 0 disables time-based saves
    keep_last: int = 2
    validate_every: int = 0  # steps; 0 disables validation
    validation_set: str = ""  # saved validation set (.safetensors); "" = <run dir>/validation_set.safetensors
    validation_crops: int = 4  # crops drawn from the shards when the validation set is built
    pictures_every: int = 0  # steps; 0 = with every checkpoint

    def check(self, launch: "LaunchConfig") -> None:
        require(self.steps >= 0, "train.steps", "must be >= 1 (or 0 to derive it from train.epochs)")
        require(self.steps > 0 or self.epochs > 0, "train.steps",
                "0 derives the steps from train.epochs, which is 0 too: set one of them")
        require(self.epochs >= 0 and math.isfinite(self.epochs), "train.epochs", "must be >= 0")
        require(self.warmup_epochs >= 0 and (self.epochs == 0 or self.warmup_epochs <= self.epochs),
                "train.warmup_epochs", "must be >= 0 and at most train.epochs")
        require(self.micro_batch >= 1, "train.micro_batch", "must be >= 1")
        require(self.grad_accum >= 0, "train.grad_accum",
                "must be >= 1 (or 0 to derive it from train.global_batch_crops)")
        require(self.global_batch_crops >= 0, "train.global_batch_crops",
                "must be >= 0 (0 = workers x micro_batch x grad_accum)")
        require(self.lr >= 0, "train.lr", "must be >= 0 (0 derives it from train.base_lr)")
        require(self.base_lr > 0, "train.base_lr", "must be > 0")
        require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
                "needs two values in [0, 1)")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        choice(self.precision, "train.precision", ("fp32", "bf16", "fp16"))
        require(self.precision != "fp16" or launch.use_gpu, "train.precision",
                "fp16 needs launch.use_gpu = true (CPU has no fp16 training)")
        require(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(self.cpu_mmap_threshold_mib in (-1, 0) or 0.125 <= self.cpu_mmap_threshold_mib <= 32,
                "train.cpu_mmap_threshold_mib", "must be -1 (auto), 0 (glibc's default) or a size from 0.125 "
                f"(glibc's initial threshold) to 32 MiB (its cap), got {self.cpu_mmap_threshold_mib}")
        for key, least in (("checkpoint_every", 0), ("checkpoint_minutes", 0), ("keep_last", 1), ("log_every", 1),
                           ("validate_every", 0), ("validation_crops", 1), ("pictures_every", 0)):
            require(getattr(self, key) >= least, f"train.{key}", f"must be >= {least}")


@dataclass(frozen=True)
class LaunchConfig:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: str = ""  # "" starts a local Ray cluster
    storage: str = "runs"  # shared path or object-store URI for checkpoints
    name: str = ""  # run name; "" = derived from the config and time
    max_failures: int = 2
    min_workers: int = 0  # 0 = same as workers (no elasticity)
    ray_num_cpus: int = 0  # CPUs for a local cluster; 0 = all

    def check(self) -> None:
        require(self.workers >= 1, "launch.workers", "must be >= 1")
        require(0 <= self.min_workers <= self.workers, "launch.min_workers", "must be between 0 and launch.workers")
        require(self.cpus_per_worker > 0, "launch.cpus_per_worker", "must be > 0")
        require(self.max_failures >= -1, "launch.max_failures", "must be >= -1 (-1 = unlimited)")
        require(self.ray_num_cpus >= 0, "launch.ray_num_cpus", "must be >= 0")
        require(bool(self.storage), "launch.storage", "must name a path or URI")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    # where each worker's /metrics listens: "auto" = its Ray node's IP on a cluster it joined, loopback on a
    # local one or without Ray (mim_scale.metrics.resolve_addr); or an address ("0.0.0.0": every interface)
    addr: str = "auto"
    port: int = 0  # per-worker port = port + rank; 0 = ephemeral
    # file_sd targets: always <run>/prometheus_targets/rank-N.json in the driver's run folder (mim-scale monitor
    # watches it); a folder here gets a copy of each rank's file too (for a Prometheus of your own)
    targets_file: str = ""
    device_peak_flops: float = 0.0  # 0 = look up the device; used for MFU
    linger_seconds: float = 0.0  # keep /metrics up this long after the run ends, for a last scrape
    tensorboard: bool = True  # rank 0 writes RUN/tensorboard/ when the tensorboard package is installed

    def check(self) -> None:
        require(0 <= self.port < 65536, "metrics.port", "must be a TCP port (0 = ephemeral)")
        require(self.device_peak_flops >= 0, "metrics.device_peak_flops", "must be >= 0")
        require(self.linger_seconds >= 0, "metrics.linger_seconds", "must be >= 0")


@dataclass(frozen=True)
class ExportConfig:
    dtype: str = "float32"  # dtype of the exported encoder weights
    full_state: bool = False

    def check(self) -> None:
        choice(self.dtype, "export.dtype", ("float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    name: str = ""  # the shipped preset or file stem this came from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: list[str] | dict[str, Any]) -> "Config":
        """A copy with dotted-key overrides applied and the result validated."""
        return from_dict(apply_overrides(self.to_dict(), overrides))


# ---------------------------------------------------------------------------------------------
# loading

_TREES = TreeSource(
    "config",
    shipped_file=lambda name: f"{name}.toml",
    names=shipped_names,
    yaml=True,
    atomic_tables=frozenset({"mixture"}),  # an extending file's data.mixture replaces the base's whole
)


def load_config(source: str | Path | dict | None = "tiny", overrides: list[str] | None = None) -> Config:
    """Load a shipped preset name, a TOML/YAML file, or a dict; apply ``key=value`` overrides."""
    if isinstance(source, dict):
        tree = source
    else:
        tree = read_config_tree(str(source or "tiny"))
    return from_dict(apply_overrides(dict(tree), overrides or []))


def read_config_tree(source: str) -> dict[str, Any]:
    """The raw tree of a preset name or a file, with ``extends = "NAME_OR_FILE"`` resolved."""
    return _TREES.read(source)


def from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain tree."""
    cfg = build_dataclass(Config, tree, "")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# validation


def validate(cfg: Config) -> None:
    """Check ranges and the coupled sizes of MIM_METHOD.md, section by section (each section's ``check``
    sits beside its fields; the model goes first because data and masking sizes are checked against it);
    raise ConfigError naming the key."""
    cfg.model.check()
    cfg.data.check(cfg.model)
    cfg.masking.check(cfg.model)
    cfg.loss.check()
    cfg.train.check(cfg.launch)
    cfg.launch.check()
    cfg.metrics.check()
    cfg.export.check()
