"""The scripts under ``benchmarks/`` are not part of the installed package: put the checkout's root first on
``sys.path`` so the tests here import them as ``benchmarks.<script>``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
