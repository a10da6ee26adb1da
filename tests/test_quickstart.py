"""The quickstart path end to end, watched by a real Prometheus server (issues 2 and 7).

Real sample CT -> shards -> local Ray, 2 DeepSpeed ZeRO-2 workers training the tiny MiM (one worker is
made to fail once mid-run) -> checkpoint -> export -> pictures. Prometheus scrapes every worker through
the file_sd targets the workers write.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import webdataset as wds

from mim_scale.config import from_dict
from mim_scale.engine import checkpoint as ckpt
from mim_scale.export import load_encoder
from mim_scale.model import build_model
from mim_scale.quickstart import run_quickstart
from mim_scale.shards.format import decode_sample, read_manifest
from prometheus_server import PrometheusServer, scrape_config, values

STEPS = 12  # checkpoints at 6 and 12; rank 1 fails as step 9 begins
FAULT_STEP = 9


@pytest.fixture(scope="module")
def quickstart(ct_dir, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    targets = out / "runs" / "quickstart" / "prometheus_targets"
    targets.mkdir(parents=True)
    # scrape fast: the tiny steps take a fraction of a second, and every rank must be seen stepping
    prom = PrometheusServer.start(out / "prometheus",
                                  config=scrape_config(file_sd=targets / "*.json", interval="250ms"))
    try:
        artefacts = run_quickstart(out, source=ct_dir, steps=STEPS, workers=2, fault=f"raise:1:{FAULT_STEP}",
                                   overrides=["metrics.linger_seconds=3"])
        yield artefacts, prom
    finally:
        prom.stop()


def test_shards_hold_the_source_hu(quickstart, ct_dir):
    artefacts, _ = quickstart
    samples = {}
    for which in ("shards", "holdout_shards"):  # training: the NIfTI volume; held out for validation: the series
        found = set()
        for entry in read_manifest(artefacts[which])["shards"]:
            url = str(Path(artefacts[which]).parent / entry["url"])
            for raw in wds.tarfile_samples([{"url": url}]):
                vol, meta = decode_sample(raw)
                samples[meta["dataset"]] = (vol, meta)
                found.add(meta["dataset"])
        assert found == {"shards": {"abdomen-pelvis"}, "holdout_shards": {"abdomen-dicom"}}[which]
    vol, meta = samples["abdomen-pelvis"]
    source = np.asarray(nib.load(str(ct_dir / "abdomen_pelvis_ct.nii.gz")).dataobj).astype(np.float64)
    source = np.clip(source, -1024, 3071)
    # resampled 3 mm -> 1.5 mm: the same anatomy, so the same HU distribution
    assert vol.dtype == np.int16
    assert abs(vol.mean() - source.mean()) < 10
    assert abs(np.percentile(vol, 90) - np.percentile(source, 90)) < 15
    assert np.prod(vol.shape) == pytest.approx(np.prod(source.shape) * 8, rel=0.05)
    assert meta["spacing"] == pytest.approx([1.5, 1.5, 1.5])


def test_checkpoint_loads_and_resumed_after_failure(quickstart):
    artefacts, _ = quickstart
    state = ckpt.TrainState.read(artefacts["checkpoint"])
    assert state.step == STEPS
    assert state.restarts == 1  # the injected failure on rank 1 restarted the group once
    assert state.samples_seen == STEPS * 2
    cfg = from_dict(state.config)
    model = build_model(cfg)
    full = ckpt.consolidated_state_dict(artefacts["checkpoint"])
    result = model.load_state_dict(full, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.isfinite(v).all() for v in full.values())
    history = [json.loads(line) for line in (artefacts["run"] / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history]
    # the restart went back to the step-6 checkpoint: steps 7 and 8 ran twice, and no step went back further
    interval = cfg.train.checkpoint_every
    assert steps[-1] == STEPS and steps.count(interval + 1) == 2 and steps.count(FAULT_STEP) == 1
    assert all(b >= a - interval + 1 for a, b in zip(steps, steps[1:]))
    # per-level validation on the fixed set every validate_every steps and at the end; the set was drawn
    # once and found again by the restarted workers
    validated = sorted({h["step"] for h in history if "val_rec_l3" in h})
    assert validated == sorted({s for s in range(1, STEPS + 1) if s % cfg.train.validate_every == 0} | {STEPS})
    assert (artefacts["run"] / "validation_set.safetensors").is_file()
    # ... from the held-out DICOM series, labelled so
    assert {h["validation_set"] for h in history if "val_rec_l3" in h} == {"held-out"}


def test_export_loads_strictly(quickstart):
    artefacts, _ = quickstart
    encoder, config = load_encoder(artefacts["export"])
    assert config["load_report"] == {"missing": [], "unexpected": []}
    assert config["schema_version"] == 1 and config["training"]["step"] == STEPS
    full = ckpt.consolidated_state_dict(artefacts["checkpoint"])
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, full["encoder." + key]), key
    sums = dict(line.split()[::-1] for line in (artefacts["export"] / "SHA256SUMS").read_text().splitlines())
    assert set(sums) >= {"encoder.safetensors", "config.json", "README.md"}


def test_pictures_are_pngs(quickstart):
    artefacts, _ = quickstart
    for key in ("reconstruction_png", "loss_curves_png"):
        data = Path(artefacts[key]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 200 and height > 200


def test_prometheus_saw_both_ranks_step_and_restart(quickstart):
    _, prom = quickstart
    # a restarted worker is a new process on a new port (a new series): aggregate each rank's series
    first = values(prom.query("min by (rank) (min_over_time(mim_step[5m]))"), "rank")
    last = values(prom.query("max by (rank) (max_over_time(mim_step[5m]))"), "rank")
    assert set(first) == set(last) == {"0", "1"}
    for rank in ("0", "1"):
        assert last[rank] > first[rank] and last[rank] >= 3, (first, last)
    losses = values(prom.query("max by (level) (max_over_time(mim_loss[5m]))"), "level")
    assert set(losses) == {"1", "2", "3"} and all(np.isfinite(list(losses.values())))
    align = values(prom.query("max by (level) (max_over_time(mim_alignment_loss[5m]))"), "level")
    assert set(align) == {"1-2", "2-3"}
    val = values(prom.query('max by (level) (max_over_time(mim_validation_loss{set="held-out"}[5m]))'), "level")
    assert set(val) == {"1", "2", "3"} and all(np.isfinite(list(val.values())))
    restarts = prom.query("max(max_over_time(mim_restarts_total[5m]))")
    assert float(restarts[0]["value"][1]) >= 1


def test_report_regenerates_pictures(quickstart, capsys):
    from mim_scale.cli import main

    artefacts, _ = quickstart
    run = artefacts["run"]
    (run / "pictures" / "loss_curves.png").unlink()
    assert main(["report", str(run)]) == 0
    text = capsys.readouterr().out
    assert f"step {STEPS}" in text and "restarts 1" in text and "rec_l3" in text
    for name in ("loss_curves.png", "reconstruction_report.png"):
        assert (run / "pictures" / name).read_bytes()[:4] == b"\x89PNG"


def test_finetune_from_the_quickstart_export(quickstart, tmp_path):
    """The README's path: quickstart's exported encoder -> a fine-tuned segmentation model."""
    from mim_scale.cli import main

    artefacts, _ = quickstart
    out = tmp_path / "ft"
    rc = main(["finetune", "--task", "segmentation", "--recipe", "sample_ct", "--init", str(artefacts["export"]),
               "--data", str(artefacts["finetune_dataset"]), "--out", str(out), "--set", "train.steps=4"])
    assert rc == 0
    reports = list(out.rglob("*.json"))
    assert reports, "fine-tuning wrote no summary"
    text = " ".join(p.read_text() for p in reports)
    assert "liver" in text and "dice" in text.lower()
