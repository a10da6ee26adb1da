"""The direct-fit ceiling script runs on the real CT and scores each level beside predicting zeros."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_learning_ceiling_script_runs(ct_dir):
    """benchmarks/learning_ceiling.py (the model README's direct-fit yardstick) on a few crops: one line per
    level, the fit scored against the zero losses of tests/model/test_learning.py's validation set."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "learning_ceiling.py"
    out = subprocess.run([sys.executable, str(script), "--ct", str(ct_dir / "abdomen_pelvis_ct.nii.gz"),
                          "--train-crops", "16"], capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"level (\d): .* zeros ([\d.]+), neighbour fit ([\d.]+)", out)
    assert [r[0] for r in rows] == ["1", "2", "3"], out
    assert [float(r[1]) for r in rows] == pytest.approx([0.986, 0.987, 0.923], abs=0.002)  # the validation set's
    assert float(rows[2][2]) < float(rows[2][1])  # level 3's smooth targets: the fit beats zeros even on 16 crops
