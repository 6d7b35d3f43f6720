#!/bin/bash
# LUMI, once per project: a Python venv for the lesson on top of the PyTorch (ROCm build) in the
# LUMI AI Factory container. Run it on a login node, from the lesson's folder:
#
#     bash hpc/lumi/setup-venv.sh project_462000000     # your project instead of the placeholder
#
# Where things go (override with LESSON_VENV, LESSON_WORK, LESSON_SIF):
#   venv         /project/<project>/$USER/venvs/quant-lesson   (persistent, 50 GB per project)
#   pip's cache  /scratch/<project>/$USER/quant-lesson/pip-cache (your home holds only 20 GB)
#   container    lumi-multitorch-latest.sif follows the newest release; a venv belongs to the image it was
#                made in, so for one you keep set LESSON_SIF to a dated release's image (a folder in
#                /appl/local/laifs/containers/) and use the same LESSON_SIF in the batch scripts
# Docs: https://docs.lumi-supercomputer.eu/laif/software/ai-environment/
set -euo pipefail

PROJECT="${1:?usage: bash hpc/lumi/setup-venv.sh project_<number>}"
LESSON_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${LESSON_WORK:-/scratch/$PROJECT/$USER/quant-lesson}"
VENV="${LESSON_VENV:-/project/$PROJECT/$USER/venvs/quant-lesson}"
SIF="${LESSON_SIF:-/appl/local/laifs/containers/lumi-multitorch-latest.sif}"

# pip and Hugging Face write gigabytes to ~/.cache by default: send them to scratch.
export PIP_CACHE_DIR="$WORK/pip-cache"
export HF_HOME="$WORK/hf-home"
mkdir -p "$PIP_CACHE_DIR" "$HF_HOME" "$(dirname "$VENV")"

# Gives the container the LUMI file systems (and the Slingshot network libraries).
module purge
module use /appl/local/laifs/modules
module load lumi-aif-singularity-bindings

if [[ ! -x "$VENV/bin/python" ]]; then
    # --system-site-packages: the venv sees the container's PyTorch, vLLM, bitsandbytes...
    singularity exec "$SIF" python -m venv --system-site-packages "$VENV"
fi

# Pin torch to the container's own build, so that no requirement can make pip download a
# CUDA wheel from PyPI into the venv (which would hide the ROCm build and see no GPU).
singularity exec "$SIF" "$VENV/bin/python" -c 'import torch; print(f"torch=={torch.__version__}")' \
    > "$VENV/torch-constraint.txt"
singularity exec "$SIF" "$VENV/bin/python" -m pip install \
    --constraint "$VENV/torch-constraint.txt" \
    --requirement "$LESSON_DIR/hpc/requirements.txt" \
    --editable "$LESSON_DIR"

singularity exec "$SIF" "$VENV/bin/python" "$LESSON_DIR/hpc/check_env.py"
echo "Ready: $VENV (container $SIF). Next: sbatch hpc/lumi/quantize.sh"
