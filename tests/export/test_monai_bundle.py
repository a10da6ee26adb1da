"""``mim-scale export --format monai-bundle`` (issue 19 item 4): MONAI's own tooling accepts the bundle
(``python -m monai.bundle verify_net_in_out``), its parser builds the network with the safetensors weights,
and on a real CT crop the bundle's output equals ``load_encoder``'s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mim_scale.cli import main
from mim_scale.export import load_encoder
from mim_scale.export_store import ExportIntegrityError


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny_bundle"
    assert main(["export", str(trained_run), "--format", "monai-bundle", "--out", str(out)]) == 0
    return out


def test_bundle_layout_has_no_pickle(bundle):
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert files == ["SHA256SUMS", "configs/inference.json", "configs/metadata.json",
                     "configs/mim_scale_export.json", "docs/README.md", "models/model.safetensors"]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["8*n"] * 3
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 64


def test_monai_verifies_the_networks_input_and_output(bundle):
    # `network`: the architecture (network_def) with the weights the bundle's config itself loads
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network", "--meta_file",
         str(bundle / "configs" / "metadata.json"), "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--device", "cpu", "--n", "2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_parser_network_equals_load_encoder_on_real_ct(bundle, exported, ct_dir):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network").eval()
    # the bundle's own preprocessing on the real abdomen/pelvis CT, then a 16^3 crop from its middle
    item = parser.get_parsed_content("preprocessing")({"image": str(ct_dir / "abdomen_pelvis_ct.nii.gz")})
    image = item["image"].as_tensor()
    c = [s // 2 for s in image.shape[1:]]
    x = image[None, :, c[0] - 8:c[0] + 8, c[1] - 8:c[1] + 8, c[2] - 8:c[2] + 8].float()
    assert x.shape == (1, 1, 16, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.01
    encoder, _ = load_encoder(exported)
    with torch.no_grad():
        ours = encoder.eval().forward_features(x)[-1]
        theirs = net(x)
    assert theirs.shape == (1, 64, 2, 2, 2)
    assert torch.equal(theirs, ours)
    # and it is the trained encoder, not a fresh one: a different init gives different features
    fresh = parser.get_parsed_content("network_def", instantiate=True, lazy=False).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), ours)


def test_a_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil

    from mim_scale.monai_bundle import load_bundle_network

    net, _ = load_bundle_network(bundle)
    assert sum(p.numel() for p in net.parameters()) > 100_000
    bad = Path(shutil.copytree(bundle, tmp_path / "bad"))
    inference = json.loads((bad / "configs" / "inference.json").read_text())
    inference["network_def"]["_target_"] = "os.system"
    (bad / "configs" / "inference.json").write_text(json.dumps(inference))
    with pytest.raises(ExportIntegrityError, match=r"bad/configs/inference\.json: sha256"):
        load_bundle_network(bad)


def test_a_finetuned_segmentation_network_as_a_bundle(evaluation_report, ct_dir, tmp_path):
    """A `mim-scale finetune` run (the pretrained run of the evaluate fixture) -> a bundle whose parser builds
    the segmentation network with its weights, equal to the run's own network on a real CT window."""
    from monai.bundle import ConfigParser, verify_net_in_out

    from mim_scale.finetune.build import EncoderInit, build_network, model_config_from_meta
    from mim_scale.finetune.checkpoint import latest_checkpoint, load_model, read_json
    from mim_scale.finetune.recipe import recipe_from_dict
    from mim_scale.model import build_encoder

    report = json.loads(evaluation_report.read_text())
    run_dir = Path(next(r for r in report["runs"].values() if r["pretrained"])["run_dir"])
    out = tmp_path / "seg_bundle"
    assert main(["export", str(run_dir), "--format", "monai-bundle", "--out", str(out)]) == 0
    assert not list(out.rglob("*.pt"))
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    run = read_json(run_dir / "run.json")
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(run["classes"]) == 6
    verify_net_in_out(net_id="network", meta_file=str(out / "configs" / "metadata.json"),
                      config_file=str(out / "configs" / "inference.json"), bundle_root=str(out), device="cpu")

    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    parser.read_meta(str(out / "configs" / "metadata.json"))
    parser["bundle_root"] = str(out)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network").eval()
    cfg = model_config_from_meta(run, "run.json")
    own = build_network(recipe_from_dict(run["recipe"]), EncoderInit(build_encoder(cfg), cfg, "x", {}), 6)
    load_model(latest_checkpoint(run_dir) / "model.safetensors", own)
    image = parser.get_parsed_content("preprocessing")({"image": str(ct_dir / "abdomen_pelvis_ct.nii.gz")})["image"]
    roi = run["roi_size"]
    c = [s // 2 for s in image.shape[1:]]
    x = image.as_tensor()[None, :, *[slice(ci - r // 2, ci + r // 2) for ci, r in zip(c, roi)]].float()
    assert tuple(x.shape[2:]) == tuple(roi)
    with torch.no_grad():
        theirs, ours = net(x), own.eval()(x)
    assert theirs.shape == (1, 6, *roi) and torch.equal(theirs, ours)
