"""gpu/data_check.py (the data path on a lent GPU) stays runnable: a CPU smoke run at tiny size on the real
CT, whose window parity must hold here too (figures meaningless on CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

GPU = Path(__file__).resolve().parents[2] / "gpu"


def _data_check():
    spec = importlib.util.spec_from_file_location("gpu_script_data_check", GPU / "data_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_check_smoke_on_cpu(ct_dir, tmp_path):
    out = tmp_path / "data.json"
    rc = _data_check().main(["--device", "cpu", "--small", "--ct", str(ct_dir / "abdomen_pelvis_ct.nii.gz"),
                             "--workers", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["ct"].startswith("real CT")
    assert len(result["parity"]) == 4 and all(result["parity"].values())
    assert set(result["transfer"]["ms_per_crop"]) == {"int16_copy", "int16_copy_and_window", "window_alone",
                                                      "float32_copy_before"}
    assert result["loader"]["by_workers"]["1"]["crops_per_s"] > 0
    assert result["loader"]["workers_per_gpu_at"]["workers"] >= 1
