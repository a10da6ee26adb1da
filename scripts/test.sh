#!/usr/bin/env bash
# Run the test suite (what CI runs). Extra arguments go to pytest, e.g. scripts/test.sh tests/data -x
# The real sample CT comes from $MIM_SCALE_SAMPLE_DATA, else `mim-scale sample-data` fetches it once.
set -euo pipefail
cd "$(dirname "$0")/.."
export MIM_SCALE_CACHE=${MIM_SCALE_CACHE:-$HOME/.cache/mim-scale}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$MIM_SCALE_CACHE/torch_extensions}
export MIM_SCALE_PROMETHEUS=${MIM_SCALE_PROMETHEUS:-$PWD/.cache/prometheus/usr/bin/prometheus}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export TMPDIR=${TMPDIR:-/tmp}
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -ra --durations=15 "$@"
