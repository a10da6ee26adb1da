"""``mim-scale models list/show`` (issue 19 item 2): one row per export under a folder or an ``s3://`` prefix,
with what it was trained on and how it scored; the card of one export by location or by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import pytest

from mim_scale.cli import main
from mim_scale.export import export_run


@pytest.fixture(scope="module")
def shelf(trained_run, exported, evaluation_report, tmp_path_factory) -> Path:
    """A folder of exports: the plain export with an evaluate report beside it, a MONAI bundle, and an
    export whose upload died before its SHA256SUMS (not listed)."""
    root = tmp_path_factory.mktemp("shelf")
    shutil.copytree(exported, root / "tiny-v1")
    shutil.copyfile(evaluation_report, root / "tiny-v1.evaluation.json")
    export_run(trained_run, root / "bundles" / "tiny-bundle", fmt="monai-bundle")
    partial = Path(shutil.copytree(exported, root / "tiny-broken"))
    (partial / "SHA256SUMS").unlink()
    return root


def test_list_a_folder(shelf, exported, evaluation_report, capsys):
    assert main(["models", "list", str(shelf), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"tiny-v1", "tiny-bundle"}
    config = json.loads((exported / "config.json").read_text())
    report = json.loads(evaluation_report.read_text())
    pre = next(r for r in report["runs"].values() if r["pretrained"])
    for name, fmt in (("tiny-v1", "mim"), ("tiny-bundle", "monai-bundle")):
        row = rows[name]
        assert row["format"] == fmt
        assert row["parameters"] == config["parameters"] and row["steps"] == 2
        assert row["crops_seen"] == config["training"]["samples_seen"] > 0
        assert row["datasets"] == {"totalsegmentator_sample": 1}
        assert row["licenses"] == {"totalsegmentator_sample": "apache-2.0"}
        assert row["preprocessing"] == {"orientation": "SPL", "spacing_mm": 3.0, "hu_window": [-1000.0, 1000.0]}
        assert row["exported_at"]
    assert rows["tiny-v1"]["size_bytes"] == sum(p.stat().st_size for p in exported.iterdir() if p.name != "SHA256SUMS")
    assert rows["tiny-v1"]["downstream"]["mean_dice"] == pytest.approx(pre["validation"]["mean_dice"])
    assert rows["tiny-bundle"]["downstream"] == {}

    assert main(["models", "list", str(shelf)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "FORMAT", "SIZE"] and len(table) == 3
    line = next(t for t in table if t.startswith("tiny-v1 "))
    assert "totalsegmentator_sample:1" in line and "SPL 3.0mm HU[-1000,1000]" in line
    assert f"mean_dice {pre['validation']['mean_dice']:.3f}" in line


def test_list_and_show_an_s3_prefix(trained_run, s3_server, capsys):
    boto3.client("s3").create_bucket(Bucket="catalogue")
    for name in ("base-v1", "base-v2"):
        export_run(trained_run, f"s3://catalogue/exports/{name}")
    export_run(trained_run, "s3://catalogue/exports/bundles/base-bundle", fmt="monai-bundle")
    boto3.client("s3").put_object(Bucket="catalogue", Key="exports/half/config.json", Body=b"{}")  # no index
    assert main(["models", "list", "s3://catalogue/exports/", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["location"]) for r in rows] == [
        ("base-v1", "s3://catalogue/exports/base-v1"), ("base-v2", "s3://catalogue/exports/base-v2"),
        ("base-bundle", "s3://catalogue/exports/bundles/base-bundle")]
    assert all(r["steps"] == 2 and r["size_bytes"] > 100_000 for r in rows)

    assert main(["models", "show", "base-v2", "--in", "s3://catalogue/exports/"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("---\nlicense: apache-2.0\n") and "# MiM foundation encoder" in text
    assert main(["models", "show", "s3://catalogue/exports/bundles/base-bundle"]) == 0
    assert "MONAI bundle" in capsys.readouterr().out
    assert main(["models", "show", "nothing", "--in", "s3://catalogue/exports/"]) == 2
    assert "no export named 'nothing'" in capsys.readouterr().err
