#!/usr/bin/env bash
# The one script a lent GPU machine runs (from the repository root): no network, its own python3 with
# torch + triton. Every result goes under $OUT; each step is bounded by `timeout`, and a failing step
# does not stop the next one. The exit status is the number of failed steps.
#
#   OUT=/some/dir bash gpu/run_all.sh
#
# Files written (the device tool returns at most 8 files from $OUT, so steps share them sparingly):
#   summary.txt       machine, versions, how the package was made importable, one line per step
#   ops_parity.txt    every Triton kernel vs its torch reference on CUDA, small + full-size cases
#   ops_bench.txt     kernels vs eager/torch.compile, bandwidth vs peak, end-to-end MiM step
#   ops_bench.json    the same figures, machine-readable
#   engine.txt/.json  MiM step time, MFU and peak memory: base (torch) and large (DeepSpeed ZeRO-3)
#   depthwise.txt/.json  depthwise conv fwd / fwd+bwd per layout and backward variant, base shapes
#   gpu_tests.txt     pytest -m gpu
# Extend with more `step NAME SECONDS command...` lines (the lead adds the engine checks here).

set -u
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
SUMMARY=$OUT/summary.txt
FAILED=0
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS CMD...: run CMD with a time limit, output to $OUT/NAME.txt, status to the summary.
step() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc
    echo "=== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    tail -n 40 "$OUT/$name.txt"
    if [ $rc -eq 0 ]; then
        say "step $name: ok ($((SECONDS - t0)) s)"
    else
        [ $rc -eq 124 ] && say "step $name: TIMED OUT after ${limit}s" || say "step $name: FAILED rc=$rc ($((SECONDS - t0)) s)"
        FAILED=$((FAILED + 1))
    fi
}

say "date: $(date -u +%FT%TZ)"
say "host: $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
say "python: $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1)"
say "torch: $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -n 1)"
say "triton: $($PY -c 'import triton; print(triton.__version__)' 2>&1 | tail -n 1)"
say "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout') $(git status --porcelain 2>/dev/null | wc -l) changed paths"

# --- wheels carried from the development machine (DeepSpeed and what it needs that the image lacks):
# `python3 -m pip download/wheel ... -d .whl` there, `carry: [".whl"]` in the device call.
if ls .whl/*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        say "wheels: $(ls .whl | tr '\n' ' ')"
    else
        say "wheels: install FAILED"
    fi
fi

# --- make `mim_scale` (with its package-dir mapping: ops/ -> mim_scale.ops, ...) importable, offline
importable() { (cd /tmp && $PY -c 'import mim_scale.ops, mim_scale.config' >/dev/null 2>&1); }
if importable; then
    say "package: already importable"
elif timeout 120 $PY -m pip install -e . --no-deps --no-build-isolation -q >"$OUT/.pip.log" 2>&1 && importable; then
    say "package: pip install -e . --no-deps --no-build-isolation"
else
    # A folder `mim_scale` of symlinks: the source package's entries plus every mapped subpackage, read
    # from pyproject's [tool.setuptools.package-dir], so new mappings need no edit here.
    NS=$(mktemp -d)/pkgs
    $PY - "$REPO" "$NS" <<'PYEOF'
import os, sys, tomllib
repo, ns = sys.argv[1], sys.argv[2]
mapping = tomllib.load(open(os.path.join(repo, "pyproject.toml"), "rb"))["tool"]["setuptools"]["package-dir"]
root = os.path.join(ns, "mim_scale")
os.makedirs(root)
for entry in os.listdir(os.path.join(repo, mapping.get("mim_scale", "mim_scale"))):
    os.symlink(os.path.join(repo, "mim_scale", entry), os.path.join(root, entry))
for pkg, src in mapping.items():
    if pkg.startswith("mim_scale."):
        link = os.path.join(ns, *pkg.split("."))
        if not os.path.lexists(link):
            os.symlink(os.path.join(repo, src), link)
PYEOF
    export PYTHONPATH=$NS:$REPO${PYTHONPATH:+:$PYTHONPATH}
    if importable; then
        say "package: symlinked namespace at $NS (pip install did not work, see below)"
    else
        say "package: NOT importable, every step below will fail; pip said:"
        tail -n 20 "$OUT/.pip.log" 2>/dev/null | tee -a "$SUMMARY"
    fi
fi
rm -f "$OUT/.pip.log"

# The real sample CT, if the caller brought one (MIM_SCALE_SAMPLE_DATA or a checkout-local shared/ copy);
# otherwise the parity check cuts its crops from a synthetic volume and says so.
# A carried copy: `cp -r SAMPLE_CT .sample-ct` here (git-ignored), `carry: [".sample-ct"]` in the call.
if [ -z "${MIM_SCALE_SAMPLE_DATA:-}" ] && [ -d "$REPO/.sample-ct/abdomen_dicom" ]; then
    export MIM_SCALE_SAMPLE_DATA=$REPO/.sample-ct
fi
CT_ARGS=()
for cand in "${MIM_SCALE_SAMPLE_DATA:-}/abdomen_pelvis_ct.nii.gz" "$REPO/shared/data/ct/abdomen_pelvis_ct.nii.gz"; do
    if [ -f "$cand" ]; then CT_ARGS=(--ct "$cand"); break; fi
done

# --- ops: parity of every kernel on CUDA (compiled), then the benchmark (< 3 minutes on an H100/H200)
step ops_parity 120 $PY -m mim_scale.ops.parity --device cuda --big ${CT_ARGS[@]+"${CT_ARGS[@]}"}
step ops_bench 180 $PY -m mim_scale.ops.bench --json "$OUT/ops_bench.json"
# --- engine: base MiM step (plain torch, bf16 autocast) and a short `large` DeepSpeed ZeRO-3 run: step
# time, MFU, peak memory (engine.json)
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
step engine 180 $PY gpu/engine_check.py --json "$OUT/engine.json"
# --- the depthwise 5x5x5 convs that bound the step: layouts and backward variants at base shapes
step depthwise 40 $PY gpu/depthwise_check.py --json "$OUT/depthwise.json"
# --- the gpu-marked tests (CUDA paths of the kernels and the metrics)
step gpu_tests 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests/ops tests/metrics tests/finetune

say "failed steps: $FAILED"
exit "$FAILED"
