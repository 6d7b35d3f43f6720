#!/usr/bin/env bash
# Maintainer run on a GPU machine without internet: install what the notebooks need from carried files,
# then run whole notebooks with tools/gpu_notebooks.py. From the repository root:
#
#   here:   python tools/gpu_bundle.py            # fills .gpu/ (ignored by git): wheels, sdists, the embedded model
#   there:  bash tools/gpu_run.sh setup           # installs into /tmp/site, builds llama.cpp and ExLlamaV2's kernels
#           bash tools/gpu_run.sh bnb             # bitsandbytes, carried in a call of its own (.gpu/bnb, 43 MB)
#           bash tools/gpu_run.sh run $OUT/record.json notebooks/01-why-quantize.ipynb ...
#   here:   python tools/gpu_notebooks.py merge <record.json>
#
# Everything lands under /tmp, which lasts as long as the machine stays up between calls.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site
export PYTHONPATH="$SITE:$PWD/src" PATH="$SITE/bin:$PATH" LD_LIBRARY_PATH="$SITE/lib:${LD_LIBRARY_PATH:-}"
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext QUANTLESSON_CACHE=/tmp/qcache MAX_JOBS=16 PYTHONUNBUFFERED=1
export LESSON_MODEL="${LESSON_MODEL:-$PWD/.gpu/model}" LESSON_DATA=embedded GPTQMODEL_CPU_WORKERS=4 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
pip_install() { python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" "$@"; }
stamp() { echo "[gpu_run $(date +%T)] $*"; }

case "${1:-}" in
setup)
  stamp "python $(python3 --version 2>&1), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  mkdir -p "$SITE" /tmp/pcre "$QUANTLESSON_CACHE/downloads"
  for deb in .gpu/w/*.deb; do dpkg -x "$deb" /tmp/pcre; done
  pip_install .gpu/w/*.whl
  stamp "wheels installed"
  PYPCRE_INCLUDE_DIR=/tmp/pcre/usr/include PYPCRE_LIBRARY_DIR=/tmp/pcre/usr/lib/x86_64-linux-gnu PYPCRE_FORCE_STATIC=1 \
    pip_install .gpu/w/*.tar.gz
  stamp "source packages built"
  cp .gpu/llama_cpp_python-*.tar.gz "$QUANTLESSON_CACHE/downloads/"  # the converter comes from here (quantlesson.llamacpp)
  (CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF" \
     CMAKE_BUILD_PARALLEL_LEVEL=16 pip_install .gpu/llama_cpp_python-*.tar.gz > /tmp/llama-build.log 2>&1; echo "llama.cpp build exit $?" >> /tmp/llama-build.log) &
  (python3 -c "import exllamav2, exllamav2.ext; print('exllamav2', exllamav2.__version__, 'kernels ready')" > /tmp/exl2-build.log 2>&1; echo "exllamav2 build exit $?" >> /tmp/exl2-build.log) &
  python3 -c "import quantlesson, transformers, compressed_tensors, llmcompressor, gptqmodel, gguf, hqq, torchao, optimum, datasets; print('imports ok: transformers', transformers.__version__)"
  wait
  tail -3 /tmp/llama-build.log /tmp/exl2-build.log
  stamp "setup done"
  ;;
bnb)
  pip_install .gpu/bnb/*.whl && stamp "bitsandbytes installed" ;;
run)
  shift
  record="$1"; shift
  python3 tools/gpu_notebooks.py run "$record" "$@"
  ;;
parallel)
  # parallel OUT NB...: every notebook at once (one GPU holds them all; timings inside them are then not comparable).
  # Writes OUT/record.json (all rows) and OUT/logs.txt (the end of each notebook's output).
  shift
  out="$1"; shift
  mkdir -p /tmp/runs
  for notebook in "$@"; do
    name=$(basename "$notebook" .ipynb)
    python3 tools/gpu_notebooks.py run "/tmp/runs/record-$name.json" "$notebook" > "/tmp/runs/log-$name.txt" 2>&1 &
  done
  wait || true
  for notebook in "$@"; do
    name=$(basename "$notebook" .ipynb)
    { echo "########## $name"; tail -n 120 "/tmp/runs/log-$name.txt"; } >> "$out/logs.txt"
    grep "^=== " "/tmp/runs/log-$name.txt" || echo "=== $name: no result"
  done
  python3 -c "import json, sys, glob; json.dump([r for f in sorted(glob.glob('/tmp/runs/record-*.json')) for r in json.load(open(f))], open(sys.argv[1], 'w'), indent=1)" "$out/record.json"
  ;;
*)
  sed -n 2,10p "$0"; exit 2 ;;
esac
