"""The quickstart path end to end, watched by a real Prometheus server (issues 2, 7 and 20).

Real sample CT -> shards -> local Ray, 2 DeepSpeed ZeRO-2 workers training the tiny MiM (one worker is
made to fail once mid-run) -> checkpoint -> export -> pictures. Prometheus scrapes every worker through
the file_sd targets the workers write. The command runs as a user runs it, ``mim-scale quickstart`` in a
pseudo-terminal (its own local Ray), and what it leaves on the screen is checked too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
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
from mim_scale.shards.format import decode_sample, read_manifest
from prometheus_server import PrometheusServer, scrape_config, values
from pty_capture import run_in_pty, screen_lines

STEPS = 12  # checkpoints at 6 and 12; rank 1 fails as step 9 begins
FAULT_STEP = 9


@pytest.fixture(scope="module")
def quickstart_run(ct_dir, tmp_path_factory):
    """``mim-scale quickstart`` in a pseudo-terminal (120 x 40), quiet as a user gets it; yields (artefacts,
    Prometheus, what the terminal showed)."""
    out = tmp_path_factory.mktemp("quickstart")
    targets = out / "runs" / "quickstart" / "prometheus_targets"
    targets.mkdir(parents=True)
    ray_tmp = Path("/tmp") / f"mimqs-{os.getpid()}"  # Ray's socket paths must stay short; never the session's Ray
    env = {k: v for k, v in os.environ.items() if k not in ("MIM_SCALE_LOG", "MIM_SCALE_VERBOSE", "RAY_ADDRESS")}
    env.update(RAY_TMPDIR=str(ray_tmp), OMP_NUM_THREADS="1", TERM="xterm")
    exe = shutil.which("mim-scale", path=str(Path(sys.executable).parent)) or "mim-scale"
    # scrape fast: the tiny steps take a fraction of a second, and every rank must be seen stepping
    prom = PrometheusServer.start(out / "prometheus",
                                  config=scrape_config(file_sd=targets / "*.json", interval="250ms"))
    try:
        rc, raw = run_in_pty([exe, "quickstart", "--out", str(out), "--from", str(ct_dir), "--steps", str(STEPS),
                              "--workers", "2", "--fault", f"raise:1:{FAULT_STEP}",
                              "--set", "metrics.linger_seconds=3"], env)
        assert rc == 0, raw[-6000:]
        artefacts = {k: Path(v) for k, v in json.loads((out / "quickstart.json").read_text()).items() if k != "seconds"}
        yield artefacts, prom, raw
    finally:
        prom.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def quickstart(quickstart_run):
    artefacts, prom, _ = quickstart_run
    return artefacts, prom


# what must never reach the quiet terminal: Python reprs, and the third-party noise of issue 20
REPR = re.compile(r"\b\w+\(\w+=|\{'[^']*':|\bPosixPath\(")
NOISE = ("PlacementGroupCleaner", "core_worker.cc", "PreemptionWatcher", "Setting accelerator to CPU",
         "FutureWarning", "TrainingReport", "Checkpoint successfully created", "(RayTrainWorker", "(TrainController",
         "Started a local Ray instance", "all_gather_into_tensor")


def test_the_terminal_shows_stages_progress_failures_and_a_summary(quickstart_run):
    artefacts, _, raw = quickstart_run
    lines = screen_lines(raw)
    shown = "\n".join(lines)
    assert len(lines) < 60, shown
    assert not [ln for ln in lines if REPR.search(ln)], shown
    assert not [n for n in NOISE if n in raw], shown
    assert [ln[:5] for ln in lines if re.match(r"\[\d/5\]", ln)] == [f"[{i}/5]" for i in range(1, 6)]
    # one live progress bar for pre-training, redrawn in place, left at the last step with the figures
    bar = [ln for ln in lines if ln.startswith("pretrain ")]
    assert len(bar) == 1 and f"{STEPS}/{STEPS} steps" in bar[0], shown
    assert raw.count("\r") > 5
    for part in ("crops/s", "loss ", "rec ", "wait ", "ETA ", f"ckpt {STEPS}", "restarts 1"):
        assert part in bar[0], (part, bar[0])
    # the injected failure is not hidden: the worker's error, its traceback, where the rest is; the restart
    run = artefacts["run"]
    assert f"worker rank 1 failed: RuntimeError: injected fault on rank 1 at step {FAULT_STEP}" in shown
    assert re.search(r'File ".*loop\.py", line \d+', shown), shown
    assert f"full log: {run / 'logs' / 'rank-1.log'}" in shown
    assert "restart 1: the worker group starts again from the step-6 checkpoint" in shown
    # ... and the log file named there holds it, with the worker's output
    assert "injected fault on rank 1" in (run / "logs" / "rank-1.log").read_text()
    assert "TrainingReport(" in (run / "logs" / "rank-0.log").read_text()  # Ray's worker lines: in the file
    events = [json.loads(ln) for ln in (run / "logs" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("failure") == 1 and {e["step"] for e in events
                                                                  if e["event"] == "checkpoint"} == {6, STEPS}
    # the summary: where everything is, what to do next
    for where in (run, artefacts["export"], artefacts["reconstruction_png"], run / "logs", artefacts["checkpoint"]):
        assert str(where) in shown, where
    assert "tensorboard --logdir" in shown and "mim-scale finetune" in shown and "Next:" in shown


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
