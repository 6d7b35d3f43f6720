#!/usr/bin/env bash
# Maintainer run for the kernels episode (08b) on the lesson's GPU machine, which has no internet:
#
#   here:   .venv/bin/python tools/gpu_bundle.py          # .gpu/w: gemlite's source, bitsandbytes' wheel, ...
#   there:  bash tools/gpu_kernels.sh $OUT TWIN [ARGS...]  # carry .gpu/w; ARGS go to tools/gpu_kernels.py
#   here:   copy $OUT/gpu-kernels-TWIN.csv to results/
#
# The packages land in /tmp/site-kernels, which lasts while the machine stays up between calls.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1 twin=$2; shift 2
SITE=/tmp/site-kernels
export PYTHONPATH="$SITE:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
if [ ! -f "$SITE/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" \
    .gpu/w/bitsandbytes-*.whl .gpu/w/gemlite-*.tar.gz
  touch "$SITE/.installed"
fi
echo "[gpu_kernels $(date +%T)] $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); python $(python3 --version 2>&1)"
python3 -c "import torch, transformers, triton, gemlite, bitsandbytes; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__, '| gemlite', gemlite.__version__, '| bitsandbytes', bitsandbytes.__version__)"
# the rows measured so far travel with the working tree; this run adds to them or replaces some
if [ ! -f "$out/gpu-kernels-$twin.csv" ] && [ -f "results/gpu-kernels-$twin.csv" ]; then cp "results/gpu-kernels-$twin.csv" "$out/"; fi
python3 tools/gpu_kernels.py "$out/gpu-kernels-$twin.csv" "$twin" "$@"
