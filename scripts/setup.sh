#!/usr/bin/env bash
# Set up mim-scale in ./.venv on a fresh machine (Python >= 3.11).
#   scripts/setup.sh          runtime: torch (CPU) first, then the package and its dependencies
#   scripts/setup.sh --test   also the test extras and a Prometheus server unpacked under .cache/
# Environment: PYTHON (default python3), MIM_SCALE_TORCH (default torch==2.13.0: installing torch
# first keeps pip from pulling a multi-GB CUDA build when another package asks for torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${MIM_SCALE_TORCH:-torch==2.13.0}
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  pip install "$TORCH_SPEC"
fi
if [ $with_tests = 1 ]; then
  echo "setup: installing mim-scale with test extras"
  pip install -e ".[test]"
  bash scripts/install_prometheus.sh .cache/prometheus >/dev/null
else
  echo "setup: installing mim-scale"
  pip install -e .
fi
# DeepSpeed JIT-compiles a few CPU ops on first use; keep them in one known place across runs.
mkdir -p "${MIM_SCALE_CACHE:-$HOME/.cache/mim-scale}/torch_extensions"
echo "setup: done (.venv/bin/mim-scale --help)"
