#!/usr/bin/env bash
# The one script a lent GPU machine runs (from the repository root): no network, its own python3 with
# torch + triton. Every result goes under $OUT; each step is bounded by `timeout`, and a failing step
# does not stop the next one. The exit status is the number of failed steps.
#
#   OUT=/some/dir bash gpu/run_all.sh
#
# Carry (device tool): [".whl", ".sample-ct", ".gpu-shards"], all made by gpu/prepare_wheels.sh here.
# Files written under $OUT, in the order the steps run (riskiest first):
#   summary.txt            machine, versions, how the package was made importable, one line per step
#   train.txt/.json        (a) base, DeepSpeed ZeRO-2, NCCL, through run_training: steps + crops/s, checkpoint,
#                          resume, export (gpu/train_check.py)
#   profile.txt/.json      (b) top CUDA kernels of a base step through run_training; the depthwise conv's
#                          kernels per pass; conv stages eager vs torch.compile at 1/2/4/8 crops
#   depthwise.txt/.json    depthwise conv fwd / fwd+bwd per layout and backward variant, base shapes
#   ops_parity.txt         (c) every Triton kernel vs its torch reference on CUDA, small + full-size cases
#   ops_bench.txt/.json    (c) each kernel vs eager and torch.compile at base shapes, `auto`'s decisions, and
#                          the end-to-end MiM step with backends reference / auto / all kernels
#   memory_*.txt, engine.json  (d) large (ZeRO-3) and huge (ZeRO-3 + CPU offload): step time, peak memory
#   throughput.txt/.json   (e) crops/s per size and card, entries for mim_scale/configs/throughput.json
#   data.txt/.json         the data path: HU window on the device bit-identical to the CPU's, int16 vs float32
#                          host-to-device copy, loader workers per GPU with pinned memory (gpu/data_check.py)
#   gpu_tests.txt          pytest -m gpu
# Python parts run on CPU in CI at tiny sizes (tests/gpu). Ray is not used here (see below).

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
BUDGET_S=${BUDGET_S:-540}
step() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc
    if [ $((SECONDS + 10)) -gt "$BUDGET_S" ]; then
        say "step $name: SKIPPED (total budget ${BUDGET_S}s spent at ${SECONDS}s)"
        FAILED=$((FAILED + 1))
        return
    fi
    [ $((SECONDS + limit)) -gt "$BUDGET_S" ] && limit=$((BUDGET_S - SECONDS))
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

# Steps run in order of risk, each bounded, within a total budget (BUDGET_S, default 540 s: the device tool's
# per-call limit is 600 s); a step that would start past the budget is skipped and says so.
# Ray stays off the GPU machine: no Ray wheel fits the carry limit, and one GPU needs no cluster; the engine
# runs through the project's non-Ray entry point (python -m mim_scale.engine.local: RANK/WORLD_SIZE as
# under torchrun, NCCL), which calls run_training exactly as a Ray worker does.
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
WORK=${WORK:-/tmp/gpu_work}
mkdir -p "$WORK"
SHARD_ARGS=()
if [ -f "$REPO/.gpu-shards/manifest.json" ]; then
    SHARD_ARGS=(--shards "$REPO/.gpu-shards")
    SHARDS=$REPO/.gpu-shards
else  # built by train_check from the carried CT (needs nibabel from .whl)
    SHARD_ARGS=(${CT_ARGS[@]+"${CT_ARGS[@]}"})
    SHARDS=$WORK/shards
fi
say "shards: ${SHARD_ARGS[*]:-none (train/profile steps will fail: carry .gpu-shards or .sample-ct)}"

# (a) the DeepSpeed engine through run_training on 1 GPU, NCCL: base ZeRO-2 steps, checkpoint, resume, export
step train 170 $PY gpu/train_check.py --config base --zero 2 --steps 4 --checkpoint-every 2 --more-steps 2 \
    --work "$WORK" ${SHARD_ARGS[@]+"${SHARD_ARGS[@]}"} --json "$OUT/train.json"
# (b) per-kernel profile of the base step through run_training; the depthwise conv's kernels (fwd, dgrad,
# wgrad); conv stages eager vs torch.compile at 1/2/4/8 crops
step profile 120 $PY gpu/profile_check.py --shards "$SHARDS" --batches 1,2,4,8 --budget-s 100 --json "$OUT/profile.json"
# the depthwise conv alone: layouts (channels-last vs contiguous) and backward variants at base shapes
step depthwise 40 $PY gpu/depthwise_check.py --json "$OUT/depthwise.json"
# (c) every kernel's parity on CUDA (the masked depthwise conv included), then its speed vs eager and compile
step ops_parity 60 $PY -m mim_scale.ops.parity --device cuda --big ${CT_ARGS[@]+"${CT_ARGS[@]}"}
step ops_bench 110 $PY benchmarks/ops_kernels.py --budget-s 70 --json "$OUT/ops_bench.json"
# (d) peak memory: large under ZeRO-3, huge under ZeRO-3 + CPU optimizer offload (one process each)
step memory_large 60 $PY gpu/engine_check.py --only large --steps 2 --append --json "$OUT/engine.json"
step memory_huge 90 $PY gpu/engine_check.py --only huge --steps 1 --append --json "$OUT/engine.json"
# (e) measured crops/s per size and card, as throughput.json entries (merge later with --merge/--into)
step throughput 20 $PY gpu/throughput.py --train "$OUT/train.json" --engine "$OUT/engine.json" \
    --source-dir "docs/gpu-results/$(date -u +%F)-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | awk '{print tolower($NF)}')" \
    --out "$OUT/throughput.json"
# the data path: window parity on CUDA, int16 vs float32 copy, loader workers per GPU (pinned)
step data 60 $PY gpu/data_check.py ${CT_ARGS[@]+"${CT_ARGS[@]}"} --json "$OUT/data.json"
# the gpu-marked tests (CUDA paths of the kernels and the metrics), if time is left
step gpu_tests 45 $PY -m pytest -q -p no:cacheprovider -x -m gpu tests/ops tests/metrics tests/finetune

say "failed steps: $FAILED"
exit "$FAILED"
