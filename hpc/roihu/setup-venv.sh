#!/bin/bash
# Roihu, once per project: a Python venv for the lesson on top of CSC's PyTorch module.
# Run it on a Roihu-GPU login node (roihu-gpu.csc.fi: the GPU nodes are ARM, like that login
# node), from the lesson's folder:
#
#     bash hpc/roihu/setup-venv.sh project_2001234     # your project instead of the placeholder
#
# Where things go (override with LESSON_VENV, LESSON_WORK):
#   venv         /projappl/<project>/$USER/venvs/quant-lesson  (software: 15 GiB, 150 000 files)
#   pip's cache  /scratch/<project>/$USER/quant-lesson/pip-cache (your home holds only 15 GiB)
# Docs: https://docs.csc.fi/apps/pytorch/ and https://docs.csc.fi/support/tutorials/python-usage-guide/
set -euo pipefail

PROJECT="${1:?usage: bash hpc/roihu/setup-venv.sh project_<number>}"
LESSON_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${LESSON_WORK:-/scratch/$PROJECT/$USER/quant-lesson}"
VENV="${LESSON_VENV:-/projappl/$PROJECT/$USER/venvs/quant-lesson}"

# pip and Hugging Face write gigabytes to ~/.cache by default: send them to scratch.
export PIP_CACHE_DIR="$WORK/pip-cache"
export HF_HOME="$WORK/hf-home"
mkdir -p "$PIP_CACHE_DIR" "$HF_HOME" "$(dirname "$VENV")"

module purge
module load python-pytorch/2.10

if [[ ! -x "$VENV/bin/python" ]]; then
    # --system-site-packages: the venv sees the module's PyTorch, transformers, bitsandbytes...
    python3 -m venv --system-site-packages "$VENV"
fi
# shellcheck source=/dev/null
source "$VENV/bin/activate"

# Pin torch to the module's own build, so that no requirement can make pip download
# another torch wheel from PyPI into the venv.
python -c 'import torch; print(f"torch=={torch.__version__}")' > "$VENV/torch-constraint.txt"
python -m pip install \
    --constraint "$VENV/torch-constraint.txt" \
    --requirement "$LESSON_DIR/hpc/requirements.txt" \
    --editable "$LESSON_DIR"

python "$LESSON_DIR/hpc/check_env.py"
echo "Ready: $VENV. Next: sbatch hpc/roihu/quantize.sh"
