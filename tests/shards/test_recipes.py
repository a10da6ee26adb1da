"""Collection recipes: a small replica of each collection's layout (cut from the real sample CT, in the
collection's own formats and folders, with the distractor files each one ships) builds exactly its CT
volumes; every distractor is reported with its reason; a tree that does not match its recipe is reported.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mim_scale.errors import UserFacingError
from mim_scale.shards import cli
from mim_scale.shards.builder import BuildConfig, build_shards
from mim_scale.shards.recipes import RECIPES, count_table, recipe_for
from mim_scale.shards.synth import write_dicom_series

pytest.importorskip("SimpleITK")

LUNA_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"  # LIDC-IDRI-style series UID
SPACING = 6.0  # the replicas' voxel size: no resampling, the build is fast


def _labels(vol: np.ndarray) -> np.ndarray:
    return (vol > 100).astype(np.uint8)


def _dicom(vol: np.ndarray, folder: Path, **kw) -> list[Path]:
    return write_dicom_series(vol, folder, spacing=(SPACING,) * 3, origin=(-150.0, -150.0, -200.0), signed=True, **kw)


def _rtstruct(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StructureSetLabel = "RTSTRUCT", generate_uid(), "GTV"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture(scope="module")
def replicas(small_ct, itk_writers, tmp_path_factory):
    """root -> {collection: folder}, and the expected {collection: (CT volumes, {relative path: reason})}."""
    ct_crop, write_itk = itk_writers
    root = tmp_path_factory.mktemp("collections")
    n = iter(range(100))
    vols = lambda: ct_crop(small_ct, next(n))  # noqa: E731 - a new distinct real-CT volume each call
    expect: dict[str, tuple[int, dict[str, str]]] = {}

    b = root / "BTCV" / "RawData"
    for i in (1, 2):
        v = vols()
        write_itk(v, b / "Training" / "img" / f"img000{i}.nii.gz")
        write_itk(_labels(v), b / "Training" / "label" / f"label000{i}.nii.gz")
    (b / "Training" / "stray_ct.nii.gz").write_bytes((b / "Training" / "img" / "img0001.nii.gz").read_bytes())
    expect["btcv"] = (2, {"RawData/Training/label/label0001.nii.gz": "label_map", "RawData/Training/label/label0002.nii.gz": "label_map",
                          "RawData/Training/stray_ct.nii.gz": "outside_recipe"})

    c = root / "TCIA-Covid19" / "Train"
    for i in (3, 4):
        v = vols()
        write_itk(v, c / f"volume-covid19-A-000{i}_ct.nii.gz")
        write_itk(_labels(v), c / f"volume-covid19-A-000{i}_seg.nii.gz")
    (c.parent / "dataset.json").write_text('{"training": []}')
    expect["tcia_covid19"] = (2, {"Train/volume-covid19-A-0003_seg.nii.gz": "label_map",
                                  "Train/volume-covid19-A-0004_seg.nii.gz": "label_map", "dataset.json": "annotation"})

    lu = root / "LUNA16"
    luna_vol = vols()  # this scan is also in the LIDC-IDRI replica, as DICOM with the same SeriesInstanceUID
    write_itk(luna_vol, lu / "subset0" / f"{LUNA_UID}.mhd")
    write_itk(vols(), lu / "subset1" / "1.3.6.1.4.1.14519.5.2.1.6279.6001.105756658031515062000744821260.mhd")
    write_itk(_labels(luna_vol), lu / "seg-lungs-LUNA16" / f"{LUNA_UID}.mhd")
    (lu / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    (lu / "evaluationScript").mkdir()
    (lu / "evaluationScript" / "noduleCADEvaluationLUNA16.py").write_text("print('froc')\n")
    expect["luna16"] = (2, {f"seg-lungs-LUNA16/{LUNA_UID}.mhd": "label_map",
                            "annotations.csv": "annotation", "evaluationScript/noduleCADEvaluationLUNA16.py": "annotation"})

    s = root / "STOIC21"
    for pid in ("1019", "1040"):
        write_itk(vols(), s / "data" / "mha" / f"{pid}.mha", compress=True)
    (s / "metadata").mkdir()
    (s / "metadata" / "reference.csv").write_text("PatientID,probCOVID,probSevere\n")
    expect["stoic21"] = (2, {"metadata/reference.csv": "annotation"})

    f = root / "FLARE23"
    for i in (1, 2):
        v = vols()
        write_itk(v, f / "imagesTr2200" / f"FLARE23_000{i}_0000.nii.gz")
        write_itk(_labels(v), f / "labelsTr2200" / f"FLARE23_000{i}.nii.gz")
    write_itk(vols(), f / "unlabeledTr1800" / "FLARE23_1801_0000.nii.gz")
    expect["flare23"] = (3, {"labelsTr2200/FLARE23_0001.nii.gz": "label_map", "labelsTr2200/FLARE23_0002.nii.gz": "label_map"})

    li = root / "LIDC-IDRI"
    study = li / "LIDC-IDRI-0001" / "01-01-2000-NA-30178"
    _dicom(luna_vol, study / "3000566-NA-03192", series_uid=LUNA_UID)  # LUNA16's copy is kept
    (study / "3000566-NA-03192" / "069.xml").write_text("<?xml version='1.0'?><LidcReadMessage/>")
    _dicom(vols(), li / "LIDC-IDRI-0002" / "01-01-2000-NA-52763" / "3000522-NA-04919")
    loc = _dicom(vols()[:1], li / "LIDC-IDRI-0002" / "01-01-2000-NA-52763" / "1-localizer",
                 tags={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    dx = _dicom(vols()[:1], li / "LIDC-IDRI-0003" / "01-01-2000-NA-12345" / "2-chest-xray", modality="DX")
    (li / "metadata.csv").write_text("Series UID,Collection\n")
    expect["lidc"] = (1, {"LIDC-IDRI-0001/01-01-2000-NA-30178/3000566-NA-03192": "duplicate_series",
                          "LIDC-IDRI-0001/01-01-2000-NA-30178/3000566-NA-03192/069.xml": "annotation",
                          str(loc[0].relative_to(li)): "localizer", str(dx[0].relative_to(li)): "non_ct_modality",
                          "metadata.csv": "annotation"})

    h = root / "HNSCC" / "HNSCC-01-0001" / "12-05-1998-NA-PETCT"
    _dicom(vols(), h / "2.000000-CT-1234")
    pet = _dicom(vols()[:6], h / "3.000000-PET-5678", modality="PT")
    seg = _dicom(vols()[:4], h / "4.000000-SEG-1", modality="SEG")
    _rtstruct(h / "5.000000-RTSTRUCT-1" / "1-1.dcm")
    hloc = _dicom(vols()[:1], h / "1.000000-scout", tags={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    hrel = "HNSCC-01-0001/12-05-1998-NA-PETCT"
    expect["hnscc"] = (1, {f"{hrel}/3.000000-PET-5678" if len(pet) > 1 else str(pet[0]): "non_ct_modality",
                           f"{hrel}/4.000000-SEG-1": "non_ct_modality", f"{hrel}/5.000000-RTSTRUCT-1/1-1.dcm": "not_image",
                           str(hloc[0].relative_to(root / "HNSCC")): "localizer"})
    assert len(seg) > 1

    t = root / "Totalsegmentator_dataset_v201"
    for sid in ("s0000", "s0011"):
        v = vols()
        write_itk(v, t / sid / "ct.nii.gz")
        for organ in ("liver", "spleen"):
            write_itk(_labels(v), t / sid / "segmentations" / f"{organ}.nii.gz")
    (t / "meta.csv").write_text("image_id;age;gender\n")
    expect["totalsegmentator"] = (2, {f"{sid}/segmentations/{o}.nii.gz": "label_map" for sid in ("s0000", "s0011")
                                      for o in ("liver", "spleen")} | {"meta.csv": "annotation"})

    folders = {"btcv": root / "BTCV", "tcia_covid19": root / "TCIA-Covid19", "luna16": lu, "stoic21": s, "flare23": f,
               "lidc": li, "hnscc": root / "HNSCC", "totalsegmentator": t}
    assert set(folders) == set(RECIPES)
    return folders, expect


@pytest.fixture(scope="module")
def built(replicas, tmp_path_factory):
    """All eight replicas in one build, through the CLI (its count table is checked too)."""
    folders, _ = replicas
    out = tmp_path_factory.mktemp("built") / "out"
    args = ["shards", "build", *[f"{k}={v}" for k, v in folders.items()], "--out", str(out), "--workers", "0",
            "--spacing", str(SPACING), "--no-progress"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(args) == 0
    rejects = [json.loads(line) for line in (out.with_name("out.private") / "rejects.jsonl").read_text().splitlines()]
    return out, rejects, buf.getvalue()


def test_every_replica_builds_exactly_its_ct_volumes(replicas, built):
    folders, expect = replicas
    out, _, _ = built
    report = json.loads((out / "build_report.json").read_text())
    assert report["datasets"] == {name: n for name, (n, _) in expect.items()}
    # LIDC-IDRI found 2 CT series; the one LUNA16 holds is not built twice
    assert report["found"] == {name: n + (name == "lidc") for name, (n, _) in expect.items()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == sum(n for n, _ in expect.values())


def test_every_distractor_is_skipped_with_its_reason(replicas, built):
    folders, expect = replicas
    _, rejects, _ = built
    got: dict[str, dict[str, str]] = {name: {} for name in folders}
    for r in rejects:
        got[r["dataset"]][str(Path(r["source"]).relative_to(folders[r["dataset"]]))] = r["reason"]
    assert got == {name: skipped for name, (_, skipped) in expect.items()}


def test_the_count_table_puts_paper_found_and_built_side_by_side(built):
    _, _, stdout = built
    rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines()[-9:]}
    assert rows["dataset"] == ["paper", "found", "built"]
    assert rows["luna16"] == ["843", "2", "2"] and rows["lidc"] == ["589", "2", "1"] and rows["flare23"] == ["4000", "3", "3"]
    assert "default" in count_table({"default": 3}, {"default": 2}) and recipe_for("LIDC_IDRI") is RECIPES["lidc"]


def test_a_layout_that_does_not_match_is_reported_not_guessed(replicas, tmp_path):
    folders, _ = replicas
    # BTCV's NIfTI tree given as LUNA16: nothing to take -> the build stops, naming what was expected and found
    with pytest.raises(UserFacingError, match=r"luna16=.*does not match the luna16 recipe.*subsetN/<SeriesInstanceUID>\.mhd.*\.nii\.gz"):
        build_shards([f"luna16={folders['btcv']}"], tmp_path / "out", workers=0, progress=False)
    # the same tree under a name without a recipe: every volume is read, labels included (rejected by intensity)
    rep = build_shards([f"mine={folders['btcv']}"], tmp_path / "out2", workers=0, progress=False,
                       config=BuildConfig(spacing=SPACING))
    assert rep.num_samples == 2 and rep.rejected == {"duplicate_content": 1, "not_ct_intensity": 2}


def test_docs_list_every_recipe_with_its_count_and_command():
    text = (Path(__file__).resolve().parents[2] / "docs" / "DATA.md").read_text()
    for r in RECIPES.values():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{r.name}` |")), "")
        assert f"| {r.paper_set} | {r.paper_count} |" in row, r.name
        assert f"mim-scale shards build {r.name}=/data/" in text, r.name
