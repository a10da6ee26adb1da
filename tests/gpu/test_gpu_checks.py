"""The lent-GPU script's Python parts stay runnable: CPU smoke runs at tiny sizes (figures meaningless here),
the throughput entries' format, and run_all.sh's wiring. The CUDA runs themselves happen on a lent card."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "gpu"
TINY = ["--set", "data.crop_size=32", "--set", "model.view_size=16"]



def _load(name: str):
    """A gpu/ script as a module (they are scripts, not a package), under a name no other test uses."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"gpu_script_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _load("throughput")


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_run_all_is_valid_bash_and_names_existing_scripts():
    text = (GPU / "run_all.sh").read_text()
    subprocess.run(["bash", "-n", str(GPU / "run_all.sh")], check=True)
    scripts = set(re.findall(r"gpu/(\w+\.py)", text))
    assert {"train_check.py", "profile_check.py", "engine_check.py", "throughput.py"} <= scripts
    assert all((GPU / s).exists() for s in scripts), scripts
    steps = re.findall(r"^step (\w+) ", text, re.MULTILINE)
    # ordered by risk: the engine through run_training first, then the profile, kernels, then memory
    assert steps.index("train") < steps.index("profile") < steps.index("ops_parity") < steps.index("memory_large")


def test_throughput_entries_have_the_shipped_format_and_merge(tmp_path):
    shipped = json.loads((REPO / "mim_scale" / "configs" / "throughput.json").read_text())
    keys = set(shipped["measurements"][0])
    train = {"config": "base", "card": "NVIDIA H200", "zero_stage": 2, "micro_batch": 1, "process_group": "nccl",
             "train": {"crops_per_s": 5.5, "steps_timed": 2}}
    engine = {"device": "NVIDIA H200", "runs": [
        {"size": "large", "mode": "deepspeed zero3 bf16 FusedAdam", "batch": 1, "crops_per_s": 2.0, "peak_mem_gib": 30},
        {"size": "huge", "mode": "deepspeed zero3 bf16 optimizer offloaded", "error": "OOM"},
        {"size": "base", "mode": "torch autocast bf16", "batch": 1, "crops_per_s": 9.0}]}
    new = (throughput.entries_from_train(train, "docs/gpu-results/d/train.json", "2026-12-02")
           + throughput.entries_from_engine(engine, "docs/gpu-results/d/engine.json", "2026-12-02"))
    assert [(e["size"], e["crops_per_s"]) for e in new] == [("base", 5.5), ("large", 2.0)]  # no failed/plain runs
    assert all(set(e) == keys for e in new)
    into = tmp_path / "throughput.json"
    into.write_text(json.dumps(shipped))
    doc = throughput.merge(new, into)
    assert len(doc["measurements"]) == len(shipped["measurements"]) + 2
    into.write_text(json.dumps(doc))
    assert len(throughput.merge(new, into)["measurements"]) == len(doc["measurements"])  # a rerun replaces


def test_profile_check_smoke_on_cpu(tmp_path):
    """Depthwise kernels per pass, conv stages eager (compiling is in the slow test: ~25 s on CPU)."""
    out = tmp_path / "profile.json"
    res = _run("profile_check.py", "--device", "cpu", "--config", "tiny", "--shards", str(tmp_path),
               "--parts", "depthwise,stages", "--small", "--batches", "1", "--reps", "1", "--top", "5",
               "--budget-s", "0", "--json", str(out), *TINY)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads(out.read_text())
    (dw,) = rec["depthwise_kernels"]
    assert set(dw["passes"]) == {"forward", "dgrad", "wgrad"}
    assert all(any("conv" in r["name"].lower() for r in rows) for rows in dw["passes"].values()), dw
    (stage,) = rec["conv_stages"]
    assert stage["views"] == 21 and stage["eager_ms"] > 0 and stage["compile"] == "skipped: time budget spent"


@pytest.fixture(scope="module")
def tiny_shards(ct_dir, tmp_path_factory) -> Path:
    return _load("train_check").build_shards_from_ct(ct_dir / "abdomen_pelvis_ct.nii.gz",
                                            tmp_path_factory.mktemp("gpu_shards") / "shards")


@pytest.mark.slow
def test_train_check_trains_resumes_and_exports_on_cpu(tiny_shards, tmp_path):
    """The (a) step end to end on CPU (gloo): ~6 minutes on a loaded 2-core machine (more under heavy load)."""
    out = tmp_path / "train.json"
    res = _run("train_check.py", "--device", "cpu", "--config", "tiny", "--shards", str(tiny_shards),
               "--work", str(tmp_path / "w"), "--steps", "3", "--checkpoint-every", "2", "--more-steps", "1",
               "--timeout", "1200", "--json", str(out), *TINY, timeout=3000)
    rec = json.loads(out.read_text())
    assert res.returncode == 0 and rec["ok"], rec.get("error")
    assert rec["resume"]["from_step"] == 3 and rec["resume"]["steps_after_resume"] == [4]
    assert "encoder.safetensors" in rec["export"]["files"] and rec["export"]["encoder_params_loaded"] > 0
    assert rec["train"]["crops_per_s"] > 0


@pytest.mark.slow
def test_profile_check_profiles_a_run_training_step_and_compiles_on_cpu(tiny_shards, tmp_path):
    out = tmp_path / "profile.json"
    res = _run("profile_check.py", "--device", "cpu", "--config", "tiny", "--shards", str(tiny_shards),
               "--parts", "step,stages", "--batches", "1", "--reps", "1", "--top", "10", "--budget-s", "3000",
               "--json", str(out), *TINY, timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["conv_stages"][0]["compile_ms"] > 0
    prof = rec["step_profile"]
    assert len(prof["step_seconds"]) == 4 and prof["total_ms"] > 0
    assert any("conv" in r["name"].lower() for r in prof["conv_kernels"])
