"""Collection recipes: what to take from each public CT collection of the paper's 1k / 10k sets, what to skip.

An input named after a recipe (``mim-scale shards build luna16=/data/LUNA16 ...``) is read with that
recipe: files matching its ``take`` pattern are its CT volumes (or, for DICOM collections, the files
that go to DICOM discovery, which then drops non-CT series and localizers by itself); files matching a
``skips`` rule are reported with that rule's reason (label maps, annotation files); any other file is
``outside_recipe``. A tree where nothing matches the recipe stops the build with the layout expected
and what was found: a layout that does not match is reported, never guessed. Inputs with any other
name are read as before (every NIfTI / MetaImage / NRRD file is a volume, the rest goes to DICOM
discovery).

Duplicates across collections: LUNA16's files are named by the LIDC-IDRI SeriesInstanceUID they were
converted from. When both are in one build, the DICOM copy of such a series is dropped as
``duplicate_series`` whatever the input order (LUNA16 keeps its volumes, LIDC-IDRI keeps the rest).
Identical built volumes are still caught by the builder's content hashes.

Patterns are Python regular expressions searched (case-insensitively) in the path relative to the
input root, with ``/`` separators. The collections' sources, licenses and layouts: docs/DATA.md.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mim_scale.errors import UserFacingError
from mim_scale.shards import formats

_LABELS = r"(^|/)(label|labels|labelsTr|labelsTs|segmentations?)[^/]*/"
# annotation / metadata / scripts shipped beside the images of most collections
_ANNOTATION = r"\.(xml|csv|tsv|json|txt|md|pdf|xlsx?|py|ipynb|html?)$"
_UID_NAME = re.compile(r"^\d+(\.\d+){4,}$")  # a DICOM UID used as a file name (LUNA16)


@dataclass(frozen=True)
class Recipe:
    """One collection. ``take``: regex of its CT volume files (DICOM collections: of the files that go to
    DICOM discovery); ``skips``: (regex, reason, why) tried before ``take``; ``paper_count``: volumes the
    MiM paper used; ``uid_from_name``: the file stem is the source SeriesInstanceUID."""

    name: str
    title: str
    paper_set: str
    paper_count: int
    source: str
    license: str
    layout: str
    take: str
    dicom: bool = False
    skips: tuple[tuple[str, str, str], ...] = ()
    uid_from_name: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def classify(self, rel: str) -> tuple[str, str]:
        """Relative posix path -> ("take", "") or (reject reason, why)."""
        for pattern, reason, why in self.skips + ((_ANNOTATION, "annotation", "annotation / metadata file"),):
            if re.search(pattern, rel, re.IGNORECASE):
                return reason, f"{why} (recipe {self.name})"
        if re.search(self.take, rel, re.IGNORECASE):
            if self.dicom and formats.file_kind(rel) != "other":
                return "outside_recipe", f"a {formats.file_kind(rel)} file in a DICOM collection (recipe {self.name} expects {self.layout})"
            return "take", ""
        return "outside_recipe", f"recipe {self.name} expects {self.layout}"


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        "btcv", "BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen)", "1k", 24,
        "https://www.synapse.org/#!Synapse:syn3193805 (RawData.zip)",
        "Synapse terms of use for the challenge data (registration; research use)",
        "img/imgNNNN.nii.gz (label/labelNNNN.nii.gz beside; also imagesTr/ + labelsTr/)",
        r"(^|/)(img|imagesTr|imagesTs)/img\d+\.nii(\.gz)?$",
        skips=((_LABELS, "label_map", "organ label map"),),
    ),
    Recipe(
        "tcia_covid19", "CT Images in COVID-19 (TCIA; the COVID-19-20 challenge's NIfTI)", "1k", 722,
        "https://www.cancerimagingarchive.net/collection/ct-images-in-covid-19/ (doi:10.7937/TCIA.2020.GQRY-NC81)",
        "TCIA data usage policy; CC BY 4.0 per the collection page (check it)",
        "volume-covid19-A-NNNN[_ct].nii.gz (lesion masks *_seg.nii.gz beside)",
        r"(^|/)volume-covid19-[a-z]-\d+(_\d+)?(_ct)?\.nii(\.gz)?$",
        skips=((r"_seg\.nii(\.gz)?$", "label_map", "lesion mask"), (_LABELS, "label_map", "lesion mask")),
    ),
    Recipe(
        "luna16", "LUNA16 (LIDC-IDRI chest CT, <= 2.5 mm slices)", "10k", 843,
        "https://luna16.grand-challenge.org/Download/ (zenodo records 3723295, 4121926)",
        "CC BY 4.0 (as LIDC-IDRI, from which it is derived)",
        "subsetN/<SeriesInstanceUID>.mhd + .raw (seg-lungs-LUNA16/ masks, annotations.csv, candidates.csv beside)",
        r"(^|/)subset\d+/\d+(\.\d+)+\.mhd$",
        skips=((r"(^|/)seg-lungs-luna16/", "label_map", "lung mask"), (r"(^|/)evaluationScript/", "annotation", "evaluation script")),
        uid_from_name=True,
    ),
    Recipe(
        "stoic21", "STOIC2021 (COVID-19 chest CT, training set)", "10k", 2000,
        "https://registry.opendata.aws/stoic2021-training/ (s3://stoic2021-training)",
        "CC BY-NC 4.0 per the registry page (check it)",
        "data/mha/<PatientID>.mha (metadata/reference.csv beside)",
        r"(^|/)mha/\d+\.mha$",
    ),
    Recipe(
        "flare23", "FLARE23 (abdominal CT, labelled + unlabelled training images)", "10k", 4000,
        "https://codalab.lisn.upsaclay.fr/competitions/12239 (FLARE 2023 challenge data)",
        "challenge terms (research use; data from public collections under their own licenses)",
        "<folder>/<case>_0000.nii.gz (nnU-Net naming; labels in labels*/ folders)",
        r"(^|/)[^/]+_0000\.nii(\.gz)?$",
        skips=((_LABELS, "label_map", "organ / lesion label map"),),
    ),
    Recipe(
        "lidc", "LIDC-IDRI (TCIA, thoracic CT)", "10k", 589,
        "https://www.cancerimagingarchive.net/collection/lidc-idri/ (doi:10.7937/K9/TCIA.2015.LO9QL9SX)",
        "CC BY 3.0 per the collection page (check it)",
        "LIDC-IDRI-NNNN/<study>/<series>/*.dcm (reader XML beside; CR/DX series too)",
        r"(^|/)LIDC-IDRI-\d{4}/",
        dicom=True, aliases=("lidc_idri",),
    ),
    Recipe(
        "hnscc", "HNSCC (TCIA, head and neck CT, PET/CT, RT)", "10k", 1071,
        "https://www.cancerimagingarchive.net/collection/hnscc/ (doi:10.7937/k9/tcia.2020.a8sh-7363)",
        "TCIA data usage policy; CC BY 3.0 / 4.0 per the collection page (check it)",
        "HNSCC-NN-NNNN/<study>/<series>/*.dcm (with PET, RTSTRUCT, SEG, localizers beside)",
        r"(^|/)HNSCC-\d{2}-\d{4}/",
        dicom=True,
    ),
    Recipe(
        "totalsegmentator", "TotalSegmentator (whole-body CT)", "10k", 1203,
        "https://zenodo.org/records/10047292 (v2; v1: 6802614)",
        "CC BY 4.0",
        "sNNNN/ct.nii.gz (sNNNN/segmentations/*.nii.gz, meta.csv beside)",
        r"(^|/)s\d{4}/ct\.nii(\.gz)?$",
        skips=((_LABELS, "label_map", "structure mask"),),
    ),
)}
_BY_NAME = {alias: r for r in RECIPES.values() for alias in (r.name, *r.aliases)}


def recipe_for(dataset: str) -> Recipe | None:
    """The recipe an input's dataset name selects (exact name or alias, case-insensitive), or None."""
    return _BY_NAME.get(dataset.lower())


@dataclass
class Selection:
    """What one input root gives: ``volumes`` (kind, path, SeriesInstanceUID or None) for the file
    readers, ``dicom_files`` for DICOM discovery, ``rejects`` (path, reason, detail)."""

    volumes: list[tuple[str, str, str | None]] = field(default_factory=list)
    dicom_files: list[str] = field(default_factory=list)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)


def select(dataset: str, files: list[str], base: Path, root: Path) -> Selection:
    """Split the files of one input (``files`` under ``base``; ``root`` as given) by reader and recipe."""
    recipe = recipe_for(dataset)
    headers = [f for f in files if formats.file_kind(f) in ("metaimage", "nrrd")]
    claimed = formats.claimed_data_files(headers)
    sel = Selection()
    taken: list[str] = []
    for f in files:
        if os.path.realpath(f) in claimed and formats.file_kind(f) == "other":
            continue  # the data file of a header in this tree: read with its header
        kind = formats.file_kind(f)
        if recipe is None:
            (sel.dicom_files.append(f) if kind == "other" else sel.volumes.append((kind, f, None)))
            continue
        rel = Path(os.path.relpath(f, base)).as_posix()
        verdict, why = recipe.classify(rel)
        if verdict != "take":
            sel.rejects.append((f, verdict, why))
            continue
        taken.append(f)
        if recipe.dicom:
            sel.dicom_files.append(f)
        elif kind == "other":
            sel.rejects.append((f, "unsupported_format", formats.describe(f)))
        else:
            stem = Path(f).name.split(".mhd")[0].split(".mha")[0] if recipe.uid_from_name else ""
            sel.volumes.append((kind, f, stem if _UID_NAME.match(stem) else None))
    if recipe is not None and not taken:
        raise UserFacingError(layout_mismatch(recipe, root, files, base))
    return sel


def layout_mismatch(recipe: Recipe, root: Path, files: list[str], base: Path) -> str:
    """The report for a tree where nothing matches the recipe: what was expected, what was found."""
    suffixes = Counter("".join(Path(f).suffixes[-2:]).lower() or "(none)" for f in files)
    tops = Counter(Path(os.path.relpath(f, base)).parts[0] for f in files if len(Path(os.path.relpath(f, base)).parts) > 1)
    found = ", ".join(f"{n} {s}" for s, n in suffixes.most_common(6)) or "no files"
    top = ", ".join(f"{d}/" for d, _ in tops.most_common(4))
    return (f"{recipe.name}={root}: the layout does not match the {recipe.name} recipe (nothing to take). Expected "
            f"{recipe.layout}; found {len(files)} file(s): {found}" + (f" (top folders: {top})" if top else "")
            + f". Point {recipe.name}= at the collection's root, or give the input another name to read every file "
            "as a volume / DICOM (see docs/DATA.md).")


def drop_duplicate_series(named: dict[str, tuple[str, str]], dicom_uids: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Keys of DICOM items to drop because a file of another collection names the same series.

    named: SeriesInstanceUID -> (item key, dataset) of files named by UID (LUNA16);
    dicom_uids: SeriesInstanceUID -> (item key, dataset) of DICOM series. Returns {dropped key: kept key}."""
    out = {}
    for uid, (key, dataset) in dicom_uids.items():
        hit = named.get(uid)
        if hit is not None and hit[1] != dataset:
            out[key] = hit[0]
    return out


def count_table(found: dict[str, int], built: dict[str, int]) -> str:
    """Per dataset: the paper's count (recipes only), CT volumes found, volumes built (after de-duplication)."""
    rows = ["dataset               paper   found   built"]
    for name in sorted(set(found) | set(built)):
        r = recipe_for(name)
        paper = str(r.paper_count) if r else "-"
        rows.append(f"{name:<20} {paper:>6}  {found.get(name, 0):>6}  {built.get(name, 0):>6}")
    return "\n".join(rows)
