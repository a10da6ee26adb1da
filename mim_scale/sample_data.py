"""Real sample CT for the quickstart, the tests and the examples, with no model-hub download.

``mim-scale sample-data DIR`` fills DIR with:

- ``abdomen_dicom/``: one CT series, 20 DICOM files (JPEG 2000 lossless), 512x512 at 0.977 mm;
- ``abdomen_dicom_labels.nii.gz``: organ labels on that series' grid;
- ``abdomen_pelvis_ct.nii.gz`` / ``abdomen_pelvis_labels.nii.gz``: an abdomen/pelvis CT at 3 mm with labels;
- ``labels_total.json``: label id -> structure name.

They are the test reference files of TotalSegmentator 2.18.0 (Apache-2.0). Sources, in order: ``--from DIR``
(a local copy), the ``MIM_SCALE_SAMPLE_DATA`` environment variable, else the package's source archive
fetched from the Python package index with pip and checked against a pinned sha256.

CPU:      mim-scale sample-data ./ct
Offline:  mim-scale sample-data ./ct --from /path/to/a/copy
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mim_scale.errors import UserFacingError
from mim_scale.fileutil import sha256_file

ENV_VAR = "MIM_SCALE_SAMPLE_DATA"
ARCHIVE_NAME = "totalsegmentator-2.18.0.tar.gz"
ARCHIVE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_REF = "totalsegmentator-2.18.0/tests/reference_files/"
# archive member -> name in the sample folder
ARCHIVE_FILES = {
    _REF + "example_seg_dicom.nii.gz": "abdomen_dicom_labels.nii.gz",
    _REF + "example_ct.nii.gz": "abdomen_pelvis_ct.nii.gz",
    _REF + "example_seg_fast_force_split.nii.gz": "abdomen_pelvis_labels.nii.gz",
}
ARCHIVE_DICOM_DIR = _REF + "example_ct_dicom/"
ARCHIVE_CLASS_MAP = "totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py"
REQUIRED = ("abdomen_dicom", "abdomen_dicom_labels.nii.gz", "abdomen_pelvis_ct.nii.gz",
            "abdomen_pelvis_labels.nii.gz", "labels_total.json")
DICOM_SLICES = 20


def is_complete(folder: Path) -> bool:
    folder = Path(folder)
    if not all((folder / name).exists() for name in REQUIRED):
        return False
    return sum(1 for p in (folder / "abdomen_dicom").iterdir() if p.is_file()) == DICOM_SLICES


def ensure_sample_data(dest: Path | None = None, source: Path | None = None,
                       cache_dir: Path | None = None) -> Path:
    """Return a folder holding the complete sample set, copying or fetching it if needed.

    With ``dest`` the files end up there; without it, a local copy (``source`` or ``$MIM_SCALE_SAMPLE_DATA``)
    is used in place, else the set is fetched into ``cache_dir / "sample-ct"``.
    """
    local = Path(source) if source else (Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None)
    if local is not None and not is_complete(local):
        raise UserFacingError(f"{local} does not hold the sample CT set (need {', '.join(REQUIRED)}, with "
                              f"{DICOM_SLICES} DICOM files); point --from or ${ENV_VAR} at a complete copy")
    if dest is None:
        if local is not None:
            return local
        dest = Path(cache_dir or Path.home() / ".cache" / "mim-scale") / "sample-ct"
    dest = Path(dest)
    if is_complete(dest):
        return dest
    if local is not None:
        _copy_tree(local, dest)
    else:
        _fetch_from_index(dest)
    return dest


def _copy_tree(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in REQUIRED:
        if (src / name).is_dir():
            shutil.copytree(src / name, tmp / name)
        else:
            shutil.copy2(src / name, tmp / name)
    _install(tmp, dest)


def _install(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place (a crash before this leaves no half set at ``dest``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        # fill an existing (incomplete) folder file by file
        for item in tmp.iterdir():
            target = dest / item.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(item), target)
        shutil.rmtree(tmp)
    else:
        tmp.rename(dest)


def _fetch_from_index(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmpdir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "totalsegmentator==2.18.0", "-d", tmpdir, "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = Path(tmpdir) / ARCHIVE_NAME
        if proc.returncode != 0 or not archive.is_file():
            raise UserFacingError(
                "could not fetch the sample CT (the TotalSegmentator 2.18.0 source archive) with pip:\n"
                f"{proc.stderr.strip()[-800:]}\n"
                f"Fix: give a local copy with `mim-scale sample-data DIR --from COPY` or set ${ENV_VAR}.")
        digest = sha256_file(archive)
        if digest != ARCHIVE_SHA256:
            raise UserFacingError(f"{archive.name}: sha256 {digest} does not match the pinned {ARCHIVE_SHA256}; "
                                  "refusing to use it")
        extract_archive(archive, dest)


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract the sample files from the verified TotalSegmentator source archive into ``dest``."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "abdomen_dicom").mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            name = member.name
            if name in ARCHIVE_FILES:
                target = tmp / ARCHIVE_FILES[name]
            elif name.startswith(ARCHIVE_DICOM_DIR) and "/" not in name[len(ARCHIVE_DICOM_DIR):]:
                target = tmp / "abdomen_dicom" / Path(name).name
            elif name == ARCHIVE_CLASS_MAP:
                source = tar.extractfile(member).read().decode()
                (tmp / "labels_total.json").write_text(json.dumps(_total_class_map(source), indent=1))
                continue
            else:
                continue
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not is_complete(tmp):
        raise UserFacingError(f"{archive}: the archive lacks some sample files (found: "
                              f"{sorted(p.name for p in tmp.iterdir())})")
    _install(tmp, dest)


def _total_class_map(source: str) -> dict[str, str]:
    """The ``class_map["total"]`` literal of TotalSegmentator's map_to_binary.py, read without running it."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "class_map":
            table = ast.literal_eval(node.value)
            return {str(k): v for k, v in table["total"].items()}
    raise UserFacingError("map_to_binary.py in the archive has no class_map literal")


def write_finetune_dataset(ct_dir: Path, out_dir: Path) -> Path:
    """A Decathlon-style ``dataset.json`` on the sample CT: train on the abdomen/pelvis volume, validate
    on the DICOM series (assembled to NIfTI by the shard builder's own reader). Returns its path."""
    import nibabel as nib
    import numpy as np

    from mim_scale.shards.dicom import list_files, load_series
    from mim_scale.shards.format import affine_ras

    ct_dir, out_dir = Path(ct_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = out_dir / "abdomen_dicom.nii.gz"
    if not series.is_file():
        vol = load_series(list_files(ct_dir / "abdomen_dicom"))
        img = nib.Nifti1Image(np.ascontiguousarray(vol.array.transpose(2, 1, 0)).astype(np.int16),
                              np.asarray(affine_ras(vol.spacing, vol.origin, vol.direction)))
        img.header.set_xyzt_units("mm")
        tmp = out_dir / ".abdomen_dicom.tmp.nii.gz"
        nib.save(img, str(tmp))
        tmp.replace(series)
    tree = {
        "name": "mim-scale sample CT",
        "description": "train: non-contrast abdomen/pelvis CT (3 mm); validation: contrast upper-abdomen "
                       "DICOM series. Labels: TotalSegmentator ids (labels_total.json).",
        "labels": json.loads((ct_dir / "labels_total.json").read_text()),
        "training": [{"image": str((ct_dir / "abdomen_pelvis_ct.nii.gz").resolve()),
                      "label": str((ct_dir / "abdomen_pelvis_labels.nii.gz").resolve())}],
        "validation": [{"image": str(series.resolve()),
                        "label": str((ct_dir / "abdomen_dicom_labels.nii.gz").resolve())}],
    }
    path = out_dir / "dataset.json"
    path.write_text(json.dumps(tree, indent=1))
    return path


def _run(args: argparse.Namespace) -> int:
    dest = ensure_sample_data(dest=Path(args.dir), source=Path(args.source) if args.source else None)
    print(f"sample CT ready in {dest}")
    for name in REQUIRED:
        print(f"  {dest / name}")
    if args.finetune_dataset:
        path = write_finetune_dataset(dest, dest / "finetune")
        print(f"  {path} (Decathlon-style: mim-scale finetune --data {path} ...)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample-data", help="get the real sample CT (DICOM series + NIfTI volumes with labels)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="folder to fill")
    p.add_argument("--from", dest="source", default=None,
                   help=f"copy from this local folder instead of fetching (default: ${ENV_VAR} if set)")
    p.add_argument("--finetune-dataset", action="store_true",
                   help="also write DIR/finetune/dataset.json (train on the NIfTI volume, validate on the DICOM series)")
    p.set_defaults(func=_run)
