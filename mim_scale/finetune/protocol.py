"""``mim-scale evaluate --protocol FILE``: does pre-training help downstream? Arms, seeds, held-out volumes.

One TOML file fixes everything a reader needs to trust the comparison (``mim_scale/configs/
protocol_sample_ct.toml`` is the shipped example):

- ``[volumes.NAME]``: ``image`` (a NIfTI file or a DICOM folder, assembled once with the shard builder's
  reader) and optional ``label``; paths relative to the TOML file, or ``sample:SET/FILE`` for a pinned
  sample set (:func:`mim_scale.sample_data.ensure_set`, fetched once, sha256-checked).
- ``[split]``: ``pretrain``, ``train`` (fine-tuning), ``test`` volume names. A test volume may never be in
  ``pretrain`` or ``train``, by name or by content (the image file's sha256): refused, with the volume named.
- ``arms``: ``scratch`` (required) and any of ``mae`` (plain MAE: ``masking.levels = 1``), ``mim``,
  ``mim_noalign`` (MiM with ``loss.align_weights = [0, 0]``, an ablation).
- ``[pretrain]``: ``config`` (+ ``set`` overrides), ``budget_tflop``: training FLOPs per pre-trained arm from
  the analytic count (:func:`mim_scale.model.flops.flops_per_sample`); each arm gets as many steps of
  ``batch`` crops as the budget buys. Pre-training crops come from the ``pretrain`` volumes reoriented and
  resampled to the fine-tuning recipe's grid, in its HU window (so the encoder sees what it will be
  fine-tuned on); the loop is :func:`mim_scale.model.plain_train.train` (single process, AdamW).
  ``per_seed = false`` pre-trains each arm once (the first seed) and fine-tunes it with every seed (cheaper;
  the report then says the spread covers fine-tuning only).
- ``[finetune]``: ``recipe`` (+ ``set``), resolved once and used for every arm and seed (only
  ``train.seed`` changes); ``low_label_fraction``: a second regime fine-tuned on that fraction of each
  training volume's axial slices (a slab centred on the labelled organs), where pre-training should
  matter most (0 = off).
- ``[probe]``: ``steps``, ``lr``: a linear probe per arm and seed (:mod:`.probe`); ``steps = 0`` = off.
- ``seeds`` (>= 3 unless ``allow_few_seeds = true``, which marks the report a smoke run), ``bootstrap``.

For each seed and arm: pre-train (seeded) -> export (safetensors + config.json, loaded back strictly) ->
fine-tune with :func:`mim_scale.finetune.train.finetune` in every regime -> probe. Every unit writes its
result atomically under the work folder and is skipped when found, so a killed run continues where it
stopped (a half-finished fine-tune resumes from its own checkpoint). The report (``format`` 1, ``kind``
``"protocol"``): per regime and arm, per-class and mean Dice per seed with mean and spread; paired
comparisons (:mod:`.stats`) of every arm against scratch and against MAE over (test volume, seed) cells;
the noise floor (scratch against scratch with the seeds rotated, the same paired comparison); the probe's
numbers; wall times; plus one PNG.

The sample CT's labels are TotalSegmentator model output, not expert ground truth; the report says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mim_scale.errors import UserFacingError
from mim_scale.finetune.checkpoint import read_json, write_json
from mim_scale.finetune.stats import bootstrap_mean, paired_differences, rotated_seeds, spread

REPORT_FORMAT = 1
LABELS_NOTE = ("Labels are TotalSegmentator model output (TotalSegmentator-style label maps shipped with the "
               "sample scans), not expert ground truth: the Dice figures compare initialisations under one "
               "protocol, they are not clinical accuracy.")
# arm -> pre-training config overrides (None: no pre-training)
ARMS: dict[str, dict[str, Any] | None] = {
    "scratch": None,
    "mae": {"masking.levels": 1},
    "mim": {},
    "mim_noalign": {"loss.align_weights": [0.0, 0.0]},
}
ARM_ORDER = tuple(ARMS)


@dataclass(frozen=True)
class Volume:
    name: str
    image: str  # as written in the TOML
    label: str | None


@dataclass(frozen=True)
class ProtocolSpec:
    """A parsed protocol file (see the module docstring); ``source`` is the TOML file."""

    source: Path
    name: str
    volumes: dict[str, Volume]
    pretrain: tuple[str, ...]
    train: tuple[str, ...]
    test: tuple[str, ...]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    config: str
    config_set: tuple[str, ...]
    budget_tflop: float
    batch: int
    lr: float | None
    pretrain_per_seed: bool
    recipe: str
    recipe_set: tuple[str, ...]
    low_label_fraction: float
    probe_steps: int
    probe_lr: float
    bootstrap: int
    allow_few_seeds: bool
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


def _err(path: Path, key: str, reason: str) -> UserFacingError:
    return UserFacingError(f"{path}: {key}: {reason}")


def load_protocol(path: str | Path) -> ProtocolSpec:
    """Parse and check a protocol TOML (every problem names the file and the key)."""
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"protocol file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserFacingError(f"{path}: not valid TOML ({exc})") from exc
    known = {"name", "arms", "seeds", "volumes", "split", "pretrain", "finetune", "probe", "report"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _err(path, unknown[0], f"unknown key (known: {', '.join(sorted(known))})")
    vols: dict[str, Volume] = {}
    for name, v in (raw.get("volumes") or {}).items():
        if not isinstance(v, dict) or not isinstance(v.get("image"), str):
            raise _err(path, f"volumes.{name}", "needs image = \"FILE or DICOM folder or sample:SET/FILE\"")
        if set(v) - {"image", "label"}:
            raise _err(path, f"volumes.{name}", f"unknown keys {sorted(set(v) - {'image', 'label'})}")
        vols[name] = Volume(name, v["image"], v.get("label"))
    split = raw.get("split") or {}
    parts = {}
    for part in ("pretrain", "train", "test"):
        names = split.get(part)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise _err(path, f"split.{part}", "needs a non-empty list of volume names")
        for n in names:
            if n not in vols:
                raise _err(path, f"split.{part}", f"volume {n!r} is not defined under [volumes]")
        if len(set(names)) != len(names):
            raise _err(path, f"split.{part}", "lists a volume twice")
        parts[part] = tuple(names)
    for part in ("train", "test"):
        for n in parts[part]:
            if not vols[n].label:
                raise _err(path, f"split.{part}", f"volume {n!r} has no label (fine-tuning and testing need one)")
    arms = raw.get("arms", ["scratch", "mae", "mim"])
    if not isinstance(arms, list) or any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
        raise _err(path, "arms", f"a list of distinct arms from {list(ARMS)}, got {arms!r}")
    if "scratch" not in arms or len(arms) < 2:
        raise _err(path, "arms", "needs 'scratch' (the baseline every gain is measured against) and one more arm")
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise _err(path, "seeds", f"a list of distinct integers, got {seeds!r}")
    rep = raw.get("report") or {}
    allow_few = bool(rep.get("allow_few_seeds", False))
    if len(seeds) < 3 and not allow_few:
        raise _err(path, "seeds", f"{len(seeds)} seed(s): a protocol result needs >= 3 (set "
                                  "report.allow_few_seeds = true for a smoke run, marked as such in the report)")
    pre, ft, pr = raw.get("pretrain") or {}, raw.get("finetune") or {}, raw.get("probe") or {}
    budget = float(pre.get("budget_tflop", 0))
    if not budget > 0 and any(ARMS[a] is not None for a in arms):
        raise _err(path, "pretrain.budget_tflop", "must be > 0 (training FLOPs per pre-trained arm, in TFLOP)")
    frac = float(ft.get("low_label_fraction", 0.0))
    if not 0.0 <= frac < 1.0:
        raise _err(path, "finetune.low_label_fraction", f"must be in [0, 1), got {frac}")
    batch = int(pre.get("batch", 2))
    if batch < 1:
        raise _err(path, "pretrain.batch", "must be >= 1")
    return ProtocolSpec(
        source=path.resolve(), name=str(raw.get("name", path.stem)), volumes=vols, pretrain=parts["pretrain"],
        train=parts["train"], test=parts["test"], arms=tuple(a for a in ARM_ORDER if a in arms),
        seeds=tuple(seeds), config=str(pre.get("config", "tiny")), config_set=tuple(pre.get("set", [])),
        budget_tflop=budget, batch=batch, lr=float(pre["lr"]) if "lr" in pre else None,
        pretrain_per_seed=bool(pre.get("per_seed", True)),
        recipe=str(ft.get("recipe", "sample_ct")), recipe_set=tuple(ft.get("set", [])),
        low_label_fraction=frac, probe_steps=int(pr.get("steps", 0)), probe_lr=float(pr.get("lr", 1e-2)),
        bootstrap=int(rep.get("bootstrap", 10_000)), allow_few_seeds=allow_few, raw=raw)


# -- volumes and the split ---------------------------------------------------------------------------------

def _resolve_path(spec: ProtocolSpec, value: str, key: str) -> Path:
    if value.startswith("sample:"):
        from mim_scale.sample_data import SETS, ensure_set

        ref = value[len("sample:"):]
        set_name, _, rel = ref.partition("/")
        if set_name not in SETS or not rel or ".." in Path(rel).parts:
            raise _err(spec.source, key, f"{value!r}: want sample:SET/FILE with SET one of {list(SETS)}")
        path = ensure_set(set_name) / rel
    else:
        path = Path(value) if Path(value).is_absolute() else spec.source.parent / value
    if not path.exists():
        raise _err(spec.source, key, f"{path} does not exist")
    return path


def _sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (sorted names and contents): a volume's identity."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def resolve_volumes(spec: ProtocolSpec, work: Path, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """name -> {"image": NIfTI path, "label": path | None, "source": original path, "sha256": identity} for
    every volume in the split; DICOM folders are assembled to ``work/volumes/NAME.nii.gz`` once."""
    from mim_scale.sample_data import series_to_nifti

    out = {}
    for name in dict.fromkeys(spec.pretrain + spec.train + spec.test):
        v = spec.volumes[name]
        src = _resolve_path(spec, v.image, f"volumes.{name}.image")
        image = src
        if src.is_dir():
            image = work / "volumes" / f"{name}.nii.gz"
            if not image.is_file():
                log(f"protocol: assembling DICOM series {src} -> {image}")
            series_to_nifti(src, image)
        label = _resolve_path(spec, v.label, f"volumes.{name}.label") if v.label else None
        out[name] = {"image": str(image), "label": str(label) if label else None, "source": str(src),
                     "sha256": _sha256(src)}
    return out


def check_split(spec: ProtocolSpec, vols: dict[str, dict[str, Any]]) -> None:
    """Refuse a test volume that is also a pre-training or fine-tuning training volume (by name or content)."""
    for t in spec.test:
        for part, names in (("pretrain", spec.pretrain), ("train", spec.train)):
            for n in names:
                if n == t:
                    raise UserFacingError(f"{spec.source}: test volume {t!r} is also in split.{part}: a test volume "
                                          "must never be seen in pre-training or fine-tuning training")
                if vols[n]["sha256"] == vols[t]["sha256"]:
                    raise UserFacingError(f"{spec.source}: test volume {t!r} is the same scan as split.{part} volume "
                                          f"{n!r} ({vols[t]['source']} and {vols[n]['source']} have one sha256): a "
                                          "test volume must never be seen in pre-training or fine-tuning training")


# -- units of work -----------------------------------------------------------------------------------------

def _resolved_recipe(spec: ProtocolSpec, model_pre: dict[str, Any] | None = None):
    from mim_scale.finetune.recipe import load_recipe

    return load_recipe(spec.recipe, list(spec.recipe_set), model_pre)


def _pretrain_config(spec: ProtocolSpec, arm: str, rec) -> Any:
    from mim_scale.config import load_config

    cfg = load_config(spec.config, list(spec.config_set))
    p = rec.preprocessing
    # pre-train in the fine-tuning window, so the encoder's inputs mean the same numbers in both
    return cfg.replace({"data.hu_min": float(p.hu_min), "data.hu_max": float(p.hu_max), **ARMS[arm]})


def arm_steps(spec: ProtocolSpec, cfg) -> tuple[int, float]:
    """(steps, training FLOPs per crop) that the budget buys for an arm's config at ``spec.batch`` crops/step."""
    from mim_scale.model.flops import flops_per_sample

    per_crop = flops_per_sample(cfg)
    return max(1, int(round(spec.budget_tflop * 1e12 / (spec.batch * per_crop)))), per_crop


def load_pretrain_volumes(paths: list[str], rec) -> list[Any]:
    """HU volumes (D, H, W) float32 on the recipe's grid (orientation and spacing), for pre-training crops."""
    import numpy as np
    from monai import transforms as mt

    p = rec.preprocessing
    tf = mt.Compose([mt.LoadImage(image_only=True), mt.EnsureChannelFirst(),
                     mt.Orientation(axcodes=p.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                     mt.Spacing(pixdim=p.spacing, mode="bilinear")])
    return [np.ascontiguousarray(np.asarray(tf(path))[0], dtype=np.float32) for path in paths]


def export_encoder(model, cfg, out: Path, rec, training: dict[str, Any]) -> Path:
    """Write ``model.encoder`` as an export folder ``load_encoder`` reads (encoder.safetensors, config.json,
    SHA256SUMS), through ``out.partial`` and a rename; loaded back strictly before it is moved into place."""
    from safetensors.torch import save_file

    import mim_scale
    from mim_scale.export_store import write_sums
    from mim_scale.model.io import (CONFIG_FILE, ENCODER_FILE, encoder_config, encoder_file_metadata, load_encoder,
                                    preprocessing_block)

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().float().contiguous() for k, v in model.encoder.state_dict().items()}
    save_file(weights, str(tmp / ENCODER_FILE), metadata=encoder_file_metadata(mim_scale.__version__))
    p = rec.preprocessing
    config = encoder_config(cfg, version=mim_scale.__version__, parameters=int(sum(v.numel() for v in weights.values())),
                            dtype="float32", preprocessing=preprocessing_block(cfg, p.orientation, list(p.spacing)),
                            training=training)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    write_sums(tmp)
    load_encoder(tmp)  # strict: the export must load before it counts as done
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _pretrain_unit(spec: ProtocolSpec, arm: str, seed: int, rec, vols: dict[str, dict[str, Any]], volumes_hu,
                   unit: Path, log) -> dict[str, Any]:
    import torch

    from mim_scale.model.plain_train import crop_stream, train
    from mim_scale.model.mim import build_model

    cfg = _pretrain_config(spec, arm, rec)
    steps, per_crop = arm_steps(spec, cfg)
    lr = spec.lr if spec.lr is not None else (cfg.train.lr or cfg.train.base_lr * spec.batch / 256)
    log(f"protocol: pre-train {arm} seed {seed}: {steps} steps x {spec.batch} crops at {per_crop / 1e9:.3f} "
        f"GFLOP/crop = {steps * spec.batch * per_crop / 1e12:.3f} TFLOP, lr {lr:g}")
    torch.manual_seed(seed)
    model = build_model(cfg)
    t0 = time.perf_counter()
    history = train(model, crop_stream(volumes_hu, cfg, spec.batch, seed), steps, lr=lr,
                    weight_decay=cfg.train.weight_decay, betas=tuple(cfg.train.betas),
                    warmup=cfg.train.warmup_steps, grad_clip=cfg.train.grad_clip, seed=seed)
    seconds = time.perf_counter() - t0
    tail = history[-min(20, len(history)):]
    final = {k: sum(h[k] for h in tail) / len(tail) for k in tail[0]}
    result = {"arm": arm, "seed": seed, "steps": steps, "batch": spec.batch, "flops_per_crop": per_crop,
              "flops": steps * spec.batch * per_crop, "lr": lr, "seconds": seconds,
              "first_losses": history[0], "final_losses_mean_last20": final,
              "volumes": {n: vols[n]["sha256"] for n in spec.pretrain}}
    export_encoder(model, cfg, unit / "export", rec, {"step": steps, "samples_seen": steps * spec.batch,
                                                      "losses": final, "masking": cfg.to_dict()["masking"],
                                                      "data": {"volumes": list(spec.pretrain)}})
    write_json(unit / "pretrain.json", result)
    return result


def _low_label_slab(image: str, label: str, classes: list[int], fraction: float, out_dir: Path,
                    name: str) -> tuple[str, str]:
    """Image and label cut to ``fraction`` of their axial slices, centred on the listed classes' voxels."""
    import nibabel as nib
    import numpy as np

    img, lab = nib.load(image), nib.load(label)
    axis = next(i for i, c in enumerate(nib.aff2axcodes(img.affine)) if c in "SI")
    arr = np.asarray(lab.dataobj)
    sel = np.isin(arr, classes) if classes else arr > 0
    n = arr.shape[axis]
    other = tuple(i for i in range(3) if i != axis)
    idx = np.flatnonzero(sel.any(axis=other))
    centre = int(round(idx.mean())) if idx.size else n // 2
    keep = max(1, int(round(fraction * n)))
    start = min(max(0, centre - keep // 2), n - keep)
    sl = [slice(None)] * 3
    sl[axis] = slice(start, start + keep)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for src, kind in ((img, "image"), (lab, "label")):
        path = out_dir / f"{name}_{kind}_{fraction:g}.nii.gz"
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.tmp.nii.gz")
            nib.save(src.slicer[tuple(sl)], str(tmp))
            tmp.replace(path)
        paths.append(str(path))
    return paths[0], paths[1]


def write_datasets(spec: ProtocolSpec, vols: dict[str, dict[str, Any]], rec, work: Path) -> dict[str, Path]:
    """regime -> Decathlon JSON: ``full`` (training = the train volumes) and, when enabled, ``low_label``;
    validation = the test volumes, in split order."""
    test = [{"image": vols[n]["image"], "label": vols[n]["label"]} for n in spec.test]
    regimes = {"full": [{"image": vols[n]["image"], "label": vols[n]["label"]} for n in spec.train]}
    if spec.low_label_fraction > 0:
        classes = sorted({v for values in rec.classes.values() for v in values})
        regimes["low_label"] = []
        for n in spec.train:
            img, lab = _low_label_slab(vols[n]["image"], vols[n]["label"], classes, spec.low_label_fraction,
                                       work / "volumes", n)
            regimes["low_label"].append({"image": img, "label": lab})
    out = {}
    for regime, training in regimes.items():
        path = work / "datasets" / f"{regime}.json"
        write_json(path, {"name": f"{spec.name} ({regime})", "training": training, "validation": test})
        out[regime] = path
    return out


# -- the run ------------------------------------------------------------------------------------------------

def _identity(spec: ProtocolSpec, vols: dict[str, dict[str, Any]], rec) -> dict[str, Any]:
    """Everything that makes two runs the same protocol (a work folder may only be resumed by the same one).

    ``arms`` and ``seeds`` are left out: units are keyed by arm and seed, so a finished protocol can be
    extended with more seeds or another arm and only the new units run."""
    raw = {k: v for k, v in spec.raw.items() if k not in ("arms", "seeds")}
    return {"protocol": raw, "volumes": {n: v["sha256"] for n, v in vols.items()}, "recipe": rec.to_dict()}


def run_protocol(protocol: str | Path, report: str | Path, work: str | Path | None = None,
                 command: str | None = None, log: Callable[[str], None] = print,
                 report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) every unit of the protocol; write the JSON report and its PNG; return the report.

    ``report_only``: run nothing; report the units already finished under ``work`` (``complete`` false and
    ``missing_units`` listed when some are not), e.g. to look at a long run while it is still going.
    """
    t_start = time.perf_counter()
    spec = load_protocol(protocol)
    report = Path(report)
    work = Path(work) if work else report.with_name(report.stem + "_runs")
    work.mkdir(parents=True, exist_ok=True)
    vols = resolve_volumes(spec, work, log)
    check_split(spec, vols)
    rec = _resolved_recipe(spec)
    if rec.task != "segmentation":
        raise _err(spec.source, "finetune.recipe", "the protocol scores segmentation (Dice); give a segmentation recipe")
    ident = _identity(spec, vols, rec)
    ident_file = work / "protocol.json"
    if ident_file.is_file():
        old = read_json(ident_file)
        old["protocol"] = {k: v for k, v in old.get("protocol", {}).items() if k not in ("arms", "seeds")}
        if old != json.loads(json.dumps(ident)):
            diff = sorted(k for k in ident if old.get(k) != json.loads(json.dumps(ident[k])))
            raise UserFacingError(f"{work} holds a run of a different protocol ({', '.join(diff)} differ); resume "
                                  "it with the same file, or choose a new --work folder")
        log(f"protocol: resuming in {work}")
    else:
        write_json(ident_file, ident)
    datasets = write_datasets(spec, vols, rec, work)
    pretrained_arms = [a for a in spec.arms if ARMS[a] is not None]
    volumes_hu = None
    units: dict[str, Any] = {"pretrain": {}, "finetune": {}, "probe": {}}
    missing: list[str] = []
    from mim_scale.finetune.probe import linear_probe
    from mim_scale.finetune.train import finetune

    scratch_model = _pretrain_config(spec, "mim", rec).model

    def encoder_for(arm: str, seed: int) -> str | None:
        """The arm's init for ``seed`` (pre-training it on first use); None if missing under report_only."""
        nonlocal volumes_hu
        if arm not in pretrained_arms:
            return "scratch"
        pseed = seed if spec.pretrain_per_seed else spec.seeds[0]
        unit = work / "pretrain" / arm / f"seed{pseed}"
        if (unit / "pretrain.json").is_file() and (unit / "export" / "config.json").is_file():
            res = read_json(unit / "pretrain.json")
        elif report_only:
            missing.append(f"pretrain/{arm}/seed{pseed}")
            return None
        else:
            if volumes_hu is None:
                volumes_hu = load_pretrain_volumes([vols[n]["image"] for n in spec.pretrain], rec)
            res = _pretrain_unit(spec, arm, pseed, rec, vols, volumes_hu, unit, log)
        units["pretrain"][f"{arm}/{pseed}"] = res
        return str(unit / "export")

    # order: the full regime for every seed first, then the probe, then the other regimes, so a run cut short
    # (or looked at with report_only) has the headline comparison with all its seeds before anything else
    plan = [("full", seed, arm) for seed in spec.seeds for arm in spec.arms]
    if spec.probe_steps > 0:
        plan += [("probe", seed, arm) for seed in spec.seeds for arm in spec.arms]
    plan += [(r, seed, arm) for r in datasets if r != "full" for seed in spec.seeds for arm in spec.arms]
    for regime, seed, arm in plan:
        seeded = rec.replace([f"train.seed={seed}"])
        if regime == "probe":
            done = work / "probe" / arm / f"seed{seed}.json"
            key, bucket = f"{arm}/{seed}", "probe"
        else:
            done = work / "finetune" / regime / arm / f"seed{seed}" / "unit.json"
            key, bucket = f"{regime}/{arm}/{seed}", "finetune"
        if done.is_file():
            encoder_for(arm, seed)  # record the pre-training unit in the report
            units[bucket][key] = read_json(done)
            continue
        if report_only:
            encoder_for(arm, seed)
            missing.append(str(done.relative_to(work)))
            continue
        init = encoder_for(arm, seed)
        model_config = scratch_model if init == "scratch" else None
        if regime == "probe":
            log(f"protocol: linear probe {arm} seed {seed}")
            res = linear_probe(datasets["full"], init, seeded, steps=spec.probe_steps, lr=spec.probe_lr,
                               model_config=model_config, log=log)
            res.update(arm=arm, seed=seed)
        else:
            log(f"protocol: fine-tune {regime} {arm} seed {seed}")
            summary = finetune(datasets[regime], init, done.parent / "run", recipe=seeded, model_config=model_config,
                               resume=True, log=log)
            res = {"arm": arm, "seed": seed, "regime": regime, "steps": summary["steps"],
                   "seconds": summary["seconds"], "validation": summary["validation"]}
        write_json(done, res)
        units[bucket][key] = res
    missing = list(dict.fromkeys(missing))
    result = build_report(spec, vols, rec, units, command=command)
    result["complete"], result["missing_units"] = not missing, missing
    result["wall_seconds"]["this_invocation"] = time.perf_counter() - t_start
    result["work"] = str(work.resolve())
    write_json(report, result)
    png = report.with_suffix(".png")
    draw_report(result, png)
    log(f"protocol: wrote {report} and {png}")
    return result


# -- the report ---------------------------------------------------------------------------------------------

def _cells(res_by_seed: dict[int, dict[str, Any]], test: tuple[str, ...], cls: str | None = None
           ) -> dict[tuple[str, int], float | None]:
    """(volume, seed) -> that volume's mean Dice over its present classes (or class ``cls``'s Dice)."""
    out: dict[tuple[str, int], float | None] = {}
    for seed, res in res_by_seed.items():
        rows = res["validation"]["per_volume"]
        for name, row in zip(test, rows):
            if cls is not None:
                out[(name, seed)] = row["dice"].get(cls)
            else:
                vals = [d for d in row["dice"].values() if d is not None]
                out[(name, seed)] = sum(vals) / len(vals) if vals else None
    return out


def _arm_table(by_arm: dict[str, dict[int, dict[str, Any]]], test: tuple[str, ...], classes: list[str],
               n_boot: int, has_mae: bool) -> dict[str, Any]:
    arms = {}
    for arm, by_seed in by_arm.items():
        per_seed = {}
        for seed, res in sorted(by_seed.items()):
            v = res["validation"]
            per_seed[str(seed)] = {
                "mean_dice": v["mean_dice"], "per_class_dice": v["per_class_dice"],
                "per_volume": {n: {"mean_dice": _cells({seed: res}, test)[(n, seed)], "dice": row["dice"]}
                               for n, row in zip(test, v["per_volume"])},
                "seconds": res.get("seconds")}
        cells = _cells(by_seed, test)
        arms[arm] = {
            "per_seed": per_seed,
            "mean_dice": spread([r["mean_dice"] for r in per_seed.values()]),
            "per_class_dice": {c: spread([r["per_class_dice"].get(c) for r in per_seed.values()]) for c in classes},
            "cells_mean_dice": {f"{v}/seed{s}": d for (v, s), d in sorted(cells.items())},
            "interval_of_mean": bootstrap_mean(
                [d for d in cells.values() if d is not None], n_boot, seed=1),
        }
    paired: dict[str, Any] = {}
    if "scratch" not in by_arm:  # a partial report before any scratch run finished
        return {"arms": arms, "paired": paired, "noise_floor": {"mean_dice": None, "why_null": "no scratch run yet"}}
    refs = ["scratch"] + (["mae"] if has_mae and "mae" in by_arm else [])
    for ref in refs:
        for arm in by_arm:
            if arm == ref or (ref == "mae" and arm == "scratch"):
                continue
            key = f"{arm} - {ref}"
            paired[key] = {"mean_dice": bootstrap_mean(
                paired_differences(_cells(by_arm[arm], test), _cells(by_arm[ref], test)), n_boot, seed=2)}
            paired[key]["per_class_dice"] = {c: bootstrap_mean(paired_differences(
                _cells(by_arm[arm], test, c), _cells(by_arm[ref], test, c)), n_boot, seed=2) for c in classes}
    sc = _cells(by_arm["scratch"], test)
    rot = rotated_seeds([c for c in sc])
    noise = {"what": "scratch (seed i) - scratch (next seed, cyclic), same (volume, seed-index) cells and the same "
                     "paired bootstrap as every arm - scratch comparison: a difference inside this interval is noise",
             "mean_dice": bootstrap_mean(paired_differences(sc, sc, rot), n_boot, seed=2) if rot else None,
             "per_class_dice": ({c: bootstrap_mean(paired_differences(_cells(by_arm["scratch"], test, c),
                                                                      _cells(by_arm["scratch"], test, c), rot),
                                                   n_boot, seed=2) for c in classes} if rot else None)}
    if not rot:
        noise["why_null"] = "one seed: no scratch-vs-scratch pair"
    return {"arms": arms, "paired": paired, "noise_floor": noise}


def build_report(spec: ProtocolSpec, vols: dict[str, dict[str, Any]], rec, units: dict[str, Any],
                 command: str | None = None) -> dict[str, Any]:
    """The protocol report (see the module docstring) from the units' results."""
    from mim_scale.finetune.train import software_versions

    classes = list(rec.classes) if rec.classes else []
    has_mae = "mae" in spec.arms
    regimes: dict[str, Any] = {}
    for key, res in units["finetune"].items():
        regime, arm, seed = key.split("/")
        regimes.setdefault(regime, {}).setdefault(arm, {})[int(seed)] = res
    out_regimes = {r: _arm_table(by_arm, spec.test, classes, spec.bootstrap, has_mae) for r, by_arm in regimes.items()}
    probe = None
    if units["probe"]:
        by_arm: dict[str, dict[int, Any]] = {}
        for key, res in units["probe"].items():
            arm, seed = key.split("/")
            by_arm.setdefault(arm, {})[int(seed)] = res
        probe = _arm_table(by_arm, spec.test, classes, spec.bootstrap, has_mae)
        probe["steps"], probe["lr"] = spec.probe_steps, spec.probe_lr
    pre = {}
    for key, res in units["pretrain"].items():
        arm, seed = key.split("/")
        pre.setdefault(arm, {})[seed] = {k: res[k] for k in ("steps", "flops", "seconds", "lr",
                                                             "final_losses_mean_last20")}
    walls: dict[str, Any] = {"pretrain": {}, "finetune": {}, "probe": {}}
    for arm in spec.arms:
        walls["pretrain"][arm] = sum(r["seconds"] for k, r in units["pretrain"].items() if k.startswith(arm + "/"))
        walls["finetune"][arm] = sum(r["seconds"] for k, r in units["finetune"].items() if k.split("/")[1] == arm)
        walls["probe"][arm] = sum(r["seconds"] for k, r in units["probe"].items() if k.split("/")[0] == arm)
    budget = {"training_flops_per_arm": spec.budget_tflop * 1e12, "batch_crops": spec.batch, "config": spec.config,
              "pretrain_per_seed": spec.pretrain_per_seed,
              "pretrain_seeds": ("one pre-training per arm and seed" if spec.pretrain_per_seed else
                                 f"one pre-training per arm (seed {spec.seeds[0]}), shared by every fine-tuning "
                                 "seed: the spread and intervals cover fine-tuning variation only"),
              "config_set": list(spec.config_set), "count": "mim_scale.model.flops.flops_per_sample (analytic, "
                                                            "3 x forward)", "arms": pre}
    smoke = len(spec.seeds) < 3 or len(spec.arms) < 3
    return {
        "format": REPORT_FORMAT, "kind": "protocol", "name": spec.name, "command": command,
        "smoke_run": smoke, "labels_note": LABELS_NOTE,
        "protocol_file": str(spec.source), "protocol": spec.raw,
        "split": {part: [{"name": n, "image": vols[n]["source"], "sha256": vols[n]["sha256"]}
                         for n in getattr(spec, part)] for part in ("pretrain", "train", "test")},
        "arms": list(spec.arms), "seeds": list(spec.seeds), "classes": classes,
        "recipe": rec.to_dict(), "low_label_fraction": spec.low_label_fraction,
        "budget": budget, "regimes": out_regimes, "probe": probe,
        "statistics": {"cell": "(test volume, seed); value = the volume's mean Dice over the classes present in its "
                               "labels (per class: that class's Dice)",
                       "interval": "percentile bootstrap of the mean paired difference over cells, "
                                   f"{spec.bootstrap} resamples, 95 %",
                       "spread": "mean and sample std over seeds of each run's mean Dice"},
        "wall_seconds": walls,
        "software": software_versions(),
    }


def draw_report(result: dict[str, Any], path: Path) -> Path:
    """Bars per class (and the mean) per arm with 95 % bootstrap intervals, one panel per regime and the probe."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(f"fine-tune: {r}", t) for r, t in result["regimes"].items()]
    if result.get("probe"):
        panels.append(("linear probe", result["probe"]))
    classes = result["classes"]
    groups = classes + ["mean"]
    if not panels:
        fig = Figure(figsize=(6, 2))
        FigureCanvasAgg(fig)
        fig.text(0.5, 0.5, f"{result['name']}: no finished units yet", ha="center")
        fig.savefig(str(path), dpi=90)
        return Path(path)
    fig = Figure(figsize=(max(8.0, 1.3 * len(groups) * len(result["arms"]) / 2), 3.6 * len(panels)))
    FigureCanvasAgg(fig)
    width = 0.8 / len(result["arms"])
    for i, (title, table) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for j, arm in enumerate(result["arms"]):
            a = table["arms"].get(arm)
            if a is None:
                continue
            heights, lows, highs = [], [], []
            for g in groups:
                # the same numbers as the table: each run's Dice (per class, or its mean over classes), mean
                # over seeds, with a bootstrap interval over seeds
                vals = [s["mean_dice"] if g == "mean" else s["per_class_dice"].get(g) for s in a["per_seed"].values()]
                vals = [v for v in vals if v is not None]
                m = sum(vals) / len(vals) if vals else math.nan
                iv = bootstrap_mean(vals, 2000, seed=1) if vals else {"low": None, "high": None}
                m = math.nan if m is None else m
                heights.append(m)
                lows.append(m - iv["low"] if iv.get("low") is not None else 0.0)
                highs.append(iv["high"] - m if iv.get("high") is not None else 0.0)
            xs = [k + (j - (len(result["arms"]) - 1) / 2) * width for k in range(len(groups))]
            ax.bar(xs, heights, width, yerr=[lows, highs], capsize=2, label=arm)
        noise = table["noise_floor"].get("mean_dice")
        extra = (f"; noise floor (scratch vs scratch) {noise['mean']:+.3f} [{noise['low']:+.3f}, {noise['high']:+.3f}]"
                 if noise and noise.get("mean") is not None else "")
        ax.set_title(f"{title}: Dice on held-out test volumes (mean over seeds, 95 % bootstrap over seeds){extra}",
                     fontsize=8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.legend(fontsize=7, ncol=len(result["arms"]))
    fig.suptitle(f"{result['name']}: {len(result['seeds'])} seeds; labels are TotalSegmentator model output, "
                 "not expert ground truth", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(str(tmp), dpi=90)
    tmp.replace(path)
    return path


def _fmt_iv(iv: dict[str, Any] | None) -> str:
    if not iv or iv.get("mean") is None:
        return "n/a"
    return f"{iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"


def markdown_table(result: dict[str, Any]) -> str:
    """The report's headline table (mean Dice per arm and regime, gains with intervals, noise floor) as Markdown."""
    panels = [(f"fine-tune, {r}", t) for r, t in result["regimes"].items()]
    if result.get("probe"):
        panels.append(("linear probe", result["probe"]))
    lines = ["| regime | arm | mean Dice (mean ± std over seeds) | "
             + " | ".join(result["classes"]) + " | vs scratch [95 % CI] | vs MAE [95 % CI] |",
             "| --- | --- | --- | " + " | ".join("---" for _ in result["classes"]) + " | --- | --- |"]
    for title, table in panels:
        for arm in result["arms"]:
            a = table["arms"].get(arm)
            if a is None:
                continue
            m = a["mean_dice"]
            std = f" ± {m['std']:.3f}" if m.get("std") is not None else ""
            per = [a["per_class_dice"][c]["mean"] for c in result["classes"]]
            cls = " | ".join("n/a" if v is None else f"{v:.3f}" for v in per)
            vs_s = "" if arm == "scratch" else _fmt_iv(table["paired"].get(f"{arm} - scratch", {}).get("mean_dice"))
            vs_m = "" if arm in ("scratch", "mae") else _fmt_iv(table["paired"].get(f"{arm} - mae", {}).get("mean_dice"))
            lines.append(f"| {title} | {arm} | {m['mean']:.3f}{std} | {cls} | {vs_s} | {vs_m} |")
        lines.append(f"| {title} | *noise floor* (scratch vs scratch, other seed) | | "
                     + " | ".join("" for _ in result["classes"])
                     + f" | {_fmt_iv(table['noise_floor'].get('mean_dice'))} | |")
    return "\n".join(lines) + "\n"


__all__ = ["ARMS", "LABELS_NOTE", "ProtocolSpec", "build_report", "check_split", "draw_report", "load_protocol",
           "markdown_table", "run_protocol"]
