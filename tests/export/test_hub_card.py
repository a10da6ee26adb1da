"""The export folder is a Hugging Face model repository as it is (issue 19 item 3): its README.md parses with
``huggingface_hub``'s own ``ModelCard`` loader (offline: ``HF_HUB_OFFLINE=1``, no server of any kind), the
licence follows the training data's terms per data set, and folders laid out as the Hub's download tools
leave them load unchanged."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from mim_scale import model_card
from mim_scale.export import export_run, load_encoder


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_card_front_matter_parses_with_the_hubs_loader(exported):
    card = _card(exported)
    data = card.data.to_dict()
    # the only training data set is the sample CT from TotalSegmentator's Apache-2.0 source archive
    assert data["license"] == "apache-2.0" and "license_name" not in data
    assert data["library_name"] == "mim-scale"
    assert data["datasets"] == ["totalsegmentator_sample"]
    assert data["metrics"] == ["mse"]
    assert {"medical-imaging", "ct", "3d", "masked-image-modeling"} <= set(data["tags"])
    assert "huggingface-cli upload" in card.text and "| totalsegmentator_sample | apache-2.0 |" in card.text
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "encoder.safetensors", "README.md"} <= files and not any(f.endswith((".pt", ".bin")) for f in files)


def test_the_weights_licence_follows_every_data_sets_terms(trained_run, tmp_path):
    nc = export_run(trained_run, tmp_path / "nc", data_licenses={"totalsegmentator_sample": "CC-BY-NC-4.0"})
    assert _card(nc).data.license == "cc-by-nc-4.0"
    # several data sets with different (or unknown) terms: `other`, each data set's terms in the card
    lic = model_card.data_licenses({"totalsegmentator": 900, "msd": 300, "site_a": 40}, {"site_a": "cc-by-nc-4.0"})
    assert {k: v["license"] for k, v in lic.items()} == {"msd": "cc-by-sa-4.0", "site_a": "cc-by-nc-4.0",
                                                         "totalsegmentator": "cc-by-4.0"}
    assert model_card.weights_license(lic) == "other"
    assert model_card.weights_license(model_card.data_licenses({"hospital_x": 10})) == "other"
    assert model_card.weights_license(model_card.data_licenses({"msd": 1, "MSD": 2})) == "cc-by-sa-4.0"


def test_evaluation_results_go_into_the_model_index(trained_run, evaluation_report, tmp_path):
    import json

    out = export_run(trained_run, tmp_path / "evaluated", evaluation=evaluation_report)
    report = json.loads(evaluation_report.read_text())
    pretrained = next(r for r in report["runs"].values() if r["pretrained"])
    card = _card(out)
    results = card.data.eval_results
    assert results and results[0].metric_type == "mean_dice"
    assert results[0].metric_value == pytest.approx(pretrained["validation"]["mean_dice"])
    assert (out / "evaluation.json").read_text() == json.dumps(report, indent=1)


def _weights(encoder) -> dict[str, torch.Tensor]:
    return encoder.state_dict()


def test_folders_as_the_hub_leaves_them_load_unchanged(exported, tmp_path):
    reference = _weights(load_encoder(exported)[0])

    # `hf download ORG/NAME --local-dir DIR`: the files, the repository's .gitattributes, and the
    # download metadata under .cache/huggingface/
    local = Path(shutil.copytree(exported, tmp_path / "local-dir"))
    (local / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    meta = local / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "encoder.safetensors.metadata").write_text("0123abcd\nsha\n1700000000.0\n")
    encoder, _ = load_encoder(local)
    assert all(torch.equal(v, reference[k]) for k, v in _weights(encoder).items())

    # the Hub cache (`snapshot_download()`): snapshots/<revision>/<file> are symlinks into blobs/
    repo = tmp_path / "hub" / "models--lab--mim-tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in exported.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    encoder, config = load_encoder(snap)
    assert all(torch.equal(v, reference[k]) for k, v in _weights(encoder).items())
    assert config["parameters"] == sum(v.numel() for v in reference.values())
