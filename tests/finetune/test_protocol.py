"""The downstream protocol (``mim-scale evaluate --protocol``): end to end at its smallest, resumed after a
SIGKILL, the split enforced, and the statistics against direct computations."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mim_scale.errors import UserFacingError
from mim_scale.finetune import protocol as proto
from mim_scale.finetune.stats import bootstrap_mean, paired_differences, rotated_seeds

CLASSES = ["liver", "spleen", "kidneys", "aorta", "stomach"]


def _toml(ct_dir: Path, *, arms=("scratch", "mim"), seeds=(0,), pretrain=("abdomen_pelvis",),
          train=("abdomen_pelvis",), test=("abdomen_dicom",), extra_volumes: str = "", few=True) -> str:
    return f"""
name = "smoke"
arms = {json.dumps(list(arms))}
seeds = {json.dumps(list(seeds))}
[volumes.abdomen_pelvis]
image = "{ct_dir / 'abdomen_pelvis_ct.nii.gz'}"
label = "{ct_dir / 'abdomen_pelvis_labels.nii.gz'}"
[volumes.abdomen_dicom]
image = "{ct_dir / 'abdomen_dicom'}"
label = "{ct_dir / 'abdomen_dicom_labels.nii.gz'}"
{extra_volumes}
[split]
pretrain = {json.dumps(list(pretrain))}
train = {json.dumps(list(train))}
test = {json.dumps(list(test))}
[pretrain]
config = "tiny"
budget_tflop = 0.03
batch = 2
[finetune]
recipe = "sample_ct"
# a coarse grid keeps CI cheap: one or two inference windows per test volume
set = ["train.steps=2", "train.log_every=1", "preprocessing.spacing=[5.0, 6.0, 6.0]", "eval.sw_overlap=0.25"]
low_label_fraction = 0.25
[probe]
steps = 3
[report]
bootstrap = 500
allow_few_seeds = {'true' if few else 'false'}
"""


@pytest.fixture(scope="module")
def killed_then_resumed(ct_dir, tmp_path_factory):
    """The smallest protocol (2 arms, 1 seed, 2-3 steps everywhere), SIGKILLed right after its first unit,
    then resumed in-process to the end. Returns (report, work folder, first unit's file and its mtime)."""
    root = tmp_path_factory.mktemp("protocol")
    toml = root / "smoke.toml"
    toml.write_text(_toml(ct_dir))
    report, work = root / "report.json", root / "runs"
    first = work / "finetune" / "full" / "scratch" / "seed0" / "unit.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "mim_scale.cli", "evaluate", "--protocol", str(toml),
                             "--out", str(report), "--work", str(work)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert first.is_file(), f"the first unit never finished:\n{err[-3000:]}"
    assert alive, "the protocol finished before it could be killed: the resume test would test nothing"
    assert not report.exists()
    mtime = first.stat().st_mtime_ns
    logs: list[str] = []
    result = proto.run_protocol(toml, report, work=work, command="test", log=logs.append)
    return result, report, work, first, mtime, logs


def test_smallest_protocol_report_is_well_formed(killed_then_resumed):
    result, report, work, *_ = killed_then_resumed
    assert json.loads(report.read_text()) == json.loads(json.dumps(result))
    assert report.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["kind"] == "protocol" and result["smoke_run"] is True
    assert "not expert ground truth" in result["labels_note"]
    assert result["arms"] == ["scratch", "mim"] and result["classes"] == CLASSES
    assert [v["name"] for v in result["split"]["test"]] == ["abdomen_dicom"]
    assert set(result["regimes"]) == {"full", "low_label"}
    for table in (*result["regimes"].values(), result["probe"]):
        for arm in ("scratch", "mim"):
            a = table["arms"][arm]
            seed0 = a["per_seed"]["0"]
            assert set(seed0["per_class_dice"]) == set(CLASSES)
            assert 0.0 <= seed0["mean_dice"] <= 1.0
            assert a["mean_dice"]["n"] == 1 and a["mean_dice"]["std"] is None  # one seed: no spread
            assert list(seed0["per_volume"]) == ["abdomen_dicom"]
        d = table["paired"]["mim - scratch"]["mean_dice"]
        assert d["n_cells"] == 1 and math.isclose(
            d["mean"], table["arms"]["mim"]["per_seed"]["0"]["per_volume"]["abdomen_dicom"]["mean_dice"]
            - table["arms"]["scratch"]["per_seed"]["0"]["per_volume"]["abdomen_dicom"]["mean_dice"])
        assert table["noise_floor"]["mean_dice"] is None and "one seed" in table["noise_floor"]["why_null"]
    # equal training FLOPs: the arm's steps are what the budget buys, and it stays within one step of it
    mim = result["budget"]["arms"]["mim"]["0"]
    per_step = mim["flops"] / mim["steps"]
    assert abs(mim["flops"] - result["budget"]["training_flops_per_arm"]) <= per_step / 2
    # the low-label regime trained on a quarter of the training volume's slices
    low = json.loads((work / "datasets" / "low_label.json").read_text())["training"][0]
    import nibabel as nib
    full_z = nib.load(str(Path(result["split"]["train"][0]["image"]))).shape[2]
    assert nib.load(low["image"]).shape[2] == round(0.25 * full_z)
    # the pretrained arm fine-tuned from its own export, which loads strictly
    run = json.loads((work / "finetune" / "full" / "mim" / "seed0" / "run" / "run.json").read_text())
    assert run["init"] == str((work / "pretrain" / "mim" / "seed0" / "export").resolve())
    assert set(result["wall_seconds"]) >= {"pretrain", "finetune", "probe"}


def test_resume_after_kill_skips_finished_units(killed_then_resumed):
    result, report, work, first, mtime, logs = killed_then_resumed
    assert first.stat().st_mtime_ns == mtime  # the unit finished before the kill was not redone
    assert any("resuming" in line for line in logs)
    assert not any("fine-tune full scratch seed 0" in line for line in logs)
    # a resumed folder refuses a different protocol
    other = work.parent / "other.toml"
    other.write_text((work.parent / "smoke.toml").read_text().replace("budget_tflop = 0.03", "budget_tflop = 0.05"))
    with pytest.raises(UserFacingError, match="different protocol"):
        proto.run_protocol(other, work.parent / "r2.json", work=work, log=lambda m: None)


def test_test_volume_in_pretraining_is_refused(ct_dir, tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text(_toml(ct_dir, pretrain=("abdomen_pelvis", "abdomen_dicom")))
    with pytest.raises(UserFacingError, match="test volume 'abdomen_dicom' is also in split.pretrain"):
        proto.run_protocol(toml, tmp_path / "r.json", log=lambda m: None)
    assert not (tmp_path / "r_runs" / "pretrain").exists()


def test_same_scan_under_another_name_is_refused(ct_dir, tmp_path):
    # the test volume's file listed again, under another name, in the pre-training corpus
    copy = tmp_path / "renamed.nii.gz"
    copy.write_bytes((ct_dir / "abdomen_pelvis_ct.nii.gz").read_bytes())
    extra = f'[volumes.other]\nimage = "{copy}"\nlabel = "{ct_dir / "abdomen_pelvis_labels.nii.gz"}"\n'
    toml = tmp_path / "p.toml"
    toml.write_text(_toml(ct_dir, train=("abdomen_dicom",), test=("other",), extra_volumes=extra))
    with pytest.raises(UserFacingError, match="test volume 'other' is the same scan as split.pretrain volume "
                                              "'abdomen_pelvis'"):
        proto.run_protocol(toml, tmp_path / "r.json", log=lambda m: None)


def test_protocol_file_errors_name_the_key(ct_dir, tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text(_toml(ct_dir, seeds=(0,), few=False))
    with pytest.raises(UserFacingError, match=r"seeds: 1 seed\(s\): a protocol result needs >= 3"):
        proto.load_protocol(toml)
    toml.write_text(_toml(ct_dir, arms=("mim", "mae")))
    with pytest.raises(UserFacingError, match="arms: needs 'scratch'"):
        proto.load_protocol(toml)
    toml.write_text(_toml(ct_dir, test=("nope",)))
    with pytest.raises(UserFacingError, match="split.test: volume 'nope' is not defined"):
        proto.load_protocol(toml)


def test_shipped_protocol_parses_and_holds_test_volumes_out():
    from importlib import resources

    path = Path(str(resources.files("mim_scale.configs").joinpath("protocol_sample_ct.toml")))
    spec = proto.load_protocol(path)
    assert len(spec.seeds) >= 3 and len(spec.arms) >= 3 and "scratch" in spec.arms
    assert not set(spec.test) & (set(spec.pretrain) | set(spec.train))


# -- statistics ----------------------------------------------------------------------------------------------

def test_bootstrap_interval_equals_direct_computation():
    diffs = np.array([0.12, -0.05, 0.30, 0.02, 0.07])
    got = bootstrap_mean(diffs, n_boot=4000, seed=7)
    # direct: the same draws, means by hand, the percentile by the linear-interpolation formula
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(diffs), size=(4000, len(diffs)))
    means = sorted(sum(diffs[i] for i in row) / len(row) for row in idx)

    def pct(q):
        h = (len(means) - 1) * q
        lo = math.floor(h)
        return means[lo] + (h - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    assert got["mean"] == pytest.approx(float(np.mean(diffs)), abs=1e-15)
    assert got["low"] == pytest.approx(pct(0.025), abs=1e-12)
    assert got["high"] == pytest.approx(pct(0.975), abs=1e-12)
    # and against the exact bootstrap distribution (all 5^5 equally likely resamples)
    exact = np.sort([np.mean(diffs[list(c)]) for c in itertools.product(range(5), repeat=5)])
    big = bootstrap_mean(diffs, n_boot=200_000, seed=3)
    assert big["low"] == pytest.approx(np.quantile(exact, 0.025), abs=0.006)
    assert big["high"] == pytest.approx(np.quantile(exact, 0.975), abs=0.006)


def test_paired_differences_and_rotated_noise_pairs():
    a = {("v1", 0): 0.5, ("v1", 1): 0.6, ("v2", 0): None, ("v2", 1): 0.4}
    b = {("v1", 0): 0.4, ("v1", 1): 0.7, ("v2", 0): 0.3, ("v2", 1): 0.1}
    assert paired_differences(a, b).tolist() == pytest.approx([0.1, -0.1, 0.3])  # the None cell is dropped
    rot = rotated_seeds(list(b))
    assert rot == {("v1", 0): ("v1", 1), ("v1", 1): ("v1", 0), ("v2", 0): ("v2", 1), ("v2", 1): ("v2", 0)}
    assert paired_differences(b, b, rot).tolist() == pytest.approx([-0.3, 0.3, 0.2, -0.2])
    assert rotated_seeds([("v1", 0)]) == {}
