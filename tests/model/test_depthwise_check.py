"""gpu/depthwise_check.py (run on a lent GPU by gpu/run_all.sh) stays runnable: a CPU smoke run on small
shapes, every variant's gradients equal to the native conv's within bf16 rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_depthwise_check_runs_on_cpu(tmp_path):
    script = Path(__file__).resolve().parents[2] / "gpu" / "depthwise_check.py"
    out = tmp_path / "dw.json"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--small", "--reps", "1", "--json", str(out)],
                   check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())
    assert {r["variant"] for r in rows} == {"native_cl", "native_ncdhw", "custom"}
    assert all(r["forward_backward_ms"] > 0 and r["grad_rel_err_vs_native_cl"] < 0.02 for r in rows), rows
