"""``mim-scale shards build | verify | inspect | synth`` (the build benchmark is ``benchmarks/shard_build.py``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mim_scale.errors import UserFacingError


def register(subparsers: argparse._SubParsersAction) -> None:
    """``mim-scale shards SUBCOMMAND``: one parser per subcommand (build, verify, inspect, synth), in help order."""
    p = subparsers.add_parser("shards", help="build, verify and inspect WebDataset CT shards")
    sub = p.add_subparsers(dest="shards_command", metavar="SUBCOMMAND")
    sub.required = True
    _register_build(sub)
    _register_verify(sub)
    _register_inspect(sub)
    _register_synth(sub)


def _register_build(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="DICOM trees / NIfTI / MetaImage / NRRD files -> de-identified shards + manifest")
    b.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="PATH, NAME=PATH (dataset name; a collection's name selects its recipe: "
                        "btcv tcia_covid19 luna16 stoic21 flare23 lidc hnscc totalsegmentator), "
                        "or a .csv/.txt list of 'PATH' or 'NAME,PATH' lines")
    b.add_argument("--out", required=True, type=Path, help="shareable output folder (shards, manifest, report)")
    b.add_argument("--dataset", default="default", help="dataset name of the inputs given without NAME=")
    b.add_argument("--private-dir", type=Path, default=None, help="private outputs (default: OUT.private beside OUT)")
    b.add_argument("--spacing", type=float, default=1.5, help="isotropic output spacing in mm (default 1.5)")
    b.add_argument("--target-shard-bytes", type=_size, default=1 << 30, help="shard size target, e.g. 1G, 256M")
    b.add_argument("--codec", choices=("npy", "npy.gz"), default="npy", help="volume member encoding: npy (default; memory-mapped crops, fastest to stream) or npy.gz (0.55x the bytes, ~3x slower to stream)")
    b.add_argument("--crop-body", action="store_true", help="crop each volume to the body (air removal)")
    b.add_argument("--exclude", type=Path, default=None, help="file of content hashes / sample keys to leave out")
    b.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                   help="set this fraction of patients (else volumes) aside as held-out validation shards in "
                        "OUT-holdout (never in OUT); point data.validation_shards at it")
    b.add_argument("--holdout-list", type=Path, default=None, metavar="FILE",
                   help="hold out these patients' folders / volume paths / sample keys (one per line)")
    b.add_argument("--workers", type=int, default=None, help="0 = in-process; N = CPUs for a local Ray cluster")
    b.add_argument("--address", default=None, help="address of an existing Ray cluster")
    b.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--worker-memory", type=_size, default=None, metavar="SIZE",
                   help="resident memory one build worker may use, e.g. 4G (default); every declared, inflated and "
                        "resampled size is checked against it before allocation (too_large otherwise)")
    b.add_argument("--allow-non-ct-sop-class", action="store_true",
                   help="build images of other SOP classes whose Modality is CT (secondary capture, ...); default: "
                        "only CT Image Storage and Enhanced CT Image Storage")
    b.add_argument("--allow-burned-in-annotation", action="store_true",
                   help="build series with BurnedInAnnotation YES (identifying text may be in the pixels)")
    b.add_argument("--allow-derived", action="store_true",
                   help="build ImageType DERIVED or SECONDARY images (reformats, computed maps)")
    b.set_defaults(func=_build)


def _register_verify(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("verify", help="re-read every shard, check sha256, decode every sample")
    v.add_argument("manifest", type=Path, help="manifest.json or its folder")
    v.set_defaults(func=_verify)


def _register_inspect(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="table of counts/shapes/spacing/HU per dataset, PNG montage of mid-slices")
    i.add_argument("manifest", type=Path)
    i.add_argument("--png", type=Path, default=None, help="montage path (default: montage.png beside the manifest)")
    i.add_argument("--max-montage", type=int, default=16)
    i.set_defaults(func=_inspect)


def _register_synth(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("synth", help="write N synthetic CT phantoms (for scale tests and benchmarks only)")
    s.add_argument("n", type=int)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--format", choices=("nifti", "dicom"), default="nifti")
    s.add_argument("--shape", default="64,128,128", help="D,H,W voxels")
    s.add_argument("--spacing", default="1.0,1.0,2.0", help="sx,sy,sz mm")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synth)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad size {text!r}") from exc


def _triple(text: str, cast: type) -> tuple:
    parts = text.split(",")
    if len(parts) != 3:
        raise UserFacingError(f"{text!r}: expected three comma-separated values")
    try:
        return tuple(cast(p) for p in parts)
    except ValueError as exc:
        raise UserFacingError(f"{text!r}: {exc}") from exc


def _build(args: argparse.Namespace) -> int:
    from mim_scale.shards.builder import BuildConfig, build_shards
    from mim_scale.shards.limits import DEFAULT_WORKER_MEMORY_BYTES
    from mim_scale.shards.recipes import count_table

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = BuildConfig(
        spacing=args.spacing, target_shard_bytes=args.target_shard_bytes, codec=args.codec, crop_body=args.crop_body,
        worker_memory_bytes=args.worker_memory or DEFAULT_WORKER_MEMORY_BYTES,
        allow_non_ct_sop_class=args.allow_non_ct_sop_class, allow_burned_in_annotation=args.allow_burned_in_annotation,
        allow_derived=args.allow_derived,
    )
    from mim_scale import console

    # the builder's tqdm bar redraws in place: on a terminal only (CI logs and files get the summary lines)
    kwargs = dict(config=config, workers=args.workers, address=args.address,
                  progress=not args.no_progress and console.is_tty(sys.stderr), metrics_port=args.metrics_port)
    if args.holdout or args.holdout_list:
        from mim_scale.shards.holdout import build_with_holdout

        rep, held = build_with_holdout(args.inputs, args.out, fraction=args.holdout, holdout_list=args.holdout_list,
                                       private_dir=args.private_dir, exclude=args.exclude, dataset=args.dataset,
                                       **kwargs)
        print(f"held out: {held.num_samples} volume(s) in {held.num_shards} shard(s) -> {held.manifest_path} "
              "(set data.validation_shards to it)")
    else:
        rep = build_shards(args.inputs, args.out, private_dir=args.private_dir, exclude=args.exclude,
                           dataset=args.dataset, **kwargs)
    print(f"{rep.num_samples} volume(s) in {rep.num_shards} shard(s) -> {rep.manifest_path}")
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(rep.rejected.items()))
    print(f"rejected: {sum(rep.rejected.values())}" + (f" ({reasons})" if reasons else "")
          + f" (details: {rep.private_dir}/rejects.jsonl)")
    print(f"this run: {rep.built_now} built in {rep.seconds:.1f} s ({rep.volumes_per_minute:.1f} vol/min), "
          f"{rep.bytes_per_voxel:.3f} shard bytes/voxel (raw int16: 2)")
    print(count_table(rep.found, rep.datasets))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from mim_scale.shards.verify import verify_shards

    rep = verify_shards(args.manifest)
    for err in rep.errors:
        print(f"ERROR {err}")
    print(f"{'OK' if rep.ok else 'FAILED'}: {rep.shards} shard(s), {rep.samples} sample(s), {rep.bytes} bytes")
    return 0 if rep.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    from mim_scale.shards.format import read_manifest
    from mim_scale.shards.inspection import collect, montage, table

    metas, slices = collect(args.manifest, max_montage=args.max_montage)
    print(table(metas))
    png = args.png or Path(read_manifest(args.manifest)["root"]) / "montage.png"
    montage(slices, png)
    print(f"montage: {png}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from mim_scale.shards.synth import write_collection

    if args.n < 1:
        raise UserFacingError("N must be at least 1")
    shape = _triple(args.shape, int)
    spacing = _triple(args.spacing, float)
    paths = write_collection(args.out, args.n, args.format, shape=shape, spacing=spacing, seed=args.seed)
    print(f"wrote {len(paths)} synthetic phantom(s) ({args.format}) under {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mim_scale.shards.cli ...``: the ``shards`` subcommands alone (same behaviour as
    ``mim-scale shards ...``, without importing the other stages)."""
    parser = argparse.ArgumentParser(prog="mim-scale")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserFacingError as exc:
        print(f"mim-scale {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
