"""The gpu/ scripts import their siblings by name (gpu/ is sys.path[0] when run as ``python gpu/<name>.py``); the
tests that load them from their files need the same."""

import sys
from pathlib import Path

GPU_SCRIPTS = str(Path(__file__).resolve().parents[2] / "gpu")
if GPU_SCRIPTS not in sys.path:
    sys.path.insert(0, GPU_SCRIPTS)
