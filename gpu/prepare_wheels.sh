#!/usr/bin/env bash
# On the development machine: fetch the wheels a lent GPU machine lacks (its image has torch, triton,
# numpy, scipy, pytest, safetensors, prometheus-client, matplotlib, pyyaml, but no DeepSpeed, MONAI,
# nibabel, pydicom, webdataset) into .whl/ (git-ignored), copies the sample CT to .sample-ct/ and builds
# .gpu-shards/ from it (one volume at 3 mm, ~3 MB: the engine steps read these). Then call the device tool with
# carry [".whl", ".sample-ct", ".gpu-shards"] and `OUT=$OUT bash gpu/run_all.sh`. Needs the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
grep -qx "/.sample-ct/" .git/info/exclude 2>/dev/null || echo "/.sample-ct/" >> .git/info/exclude
grep -qx "/.gpu-shards/" .git/info/exclude 2>/dev/null || echo "/.gpu-shards/" >> .git/info/exclude
mkdir -p .whl
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" wheel -q --no-deps deepspeed==0.19.8 -w .whl
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 \
           typing-extensions monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 pylibjpeg==2.1.0 pylibjpeg-openjpeg \
           webdataset==1.0.2 braceexpand; do
  "${PIP[@]}" download -q --no-deps --only-binary=:all: "${plat[@]}" -d .whl "$pkg"
done
if [ -n "${MIM_SCALE_SAMPLE_DATA:-}" ] && [ ! -d .sample-ct ]; then cp -r "$MIM_SCALE_SAMPLE_DATA" .sample-ct; fi
if [ ! -f .gpu-shards/manifest.json ] && [ -f .sample-ct/abdomen_pelvis_ct.nii.gz ]; then
  # the private (re-identification) folder stays outside the repository, so it is never carried
  .venv/bin/python - <<'PYEOF'
from pathlib import Path
from mim_scale.shards.builder import build_shards
build_shards([".sample-ct/abdomen_pelvis_ct.nii.gz"], ".gpu-shards", spacing=3.0, target_shard_bytes=1, workers=0,
             progress=False, private_dir=Path.home() / ".cache" / "mim-scale" / "gpu-shards.private")
PYEOF
fi
du -sh .whl .sample-ct .gpu-shards 2>/dev/null
