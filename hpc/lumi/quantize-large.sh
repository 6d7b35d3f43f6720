#!/bin/bash
# LUMI: quantize a LARGE model with GPTQ on a whole LUMI-G node (8 GCDs of 64 GB, 512 GiB of CPU memory,
# of which the job asks for 480G as the LUMI AI guide does).
# llm-compressor keeps the unquantized model in CPU memory and onloads one decoder layer at a
# time to a GPU ("sequential onloading"), so even one GCD could do it; with torchrun, 8 processes
# (one per GCD) share the calibration samples and the layers' GPTQ work.
#
#     sbatch --export=ALL,MODEL=meta-llama/Llama-3.3-70B-Instruct hpc/lumi/quantize-large.sh
#
# The model must be in $HF_HOME already (download it first: see the lesson page) or be
# downloadable from the compute node. The default, the embedded model, only shows the mechanics.
# Put your project in --account (project_462000000 is a placeholder).
#SBATCH --job-name=quantize-large
#SBATCH --account=project_462000000
#SBATCH --partition=standard-g
#SBATCH --time=04:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=56
#SBATCH --gpus-per-node=8
#SBATCH --mem=480G
#SBATCH --output=%x-%j.out
set -euo pipefail

PROJECT="${SLURM_JOB_ACCOUNT:?submit this script with sbatch}"
GPUS="${SLURM_GPUS_ON_NODE:?submit this script with sbatch}"
LESSON_DIR="${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
WORK="${LESSON_WORK:-/scratch/$PROJECT/$USER/quant-lesson}"
VENV="${LESSON_VENV:-/project/$PROJECT/$USER/venvs/quant-lesson}"
SIF="${LESSON_SIF:-/appl/local/laifs/containers/lumi-multitorch-latest.sif}"
MODEL="${MODEL:-embedded}"
SAMPLES="${SAMPLES:-512}"
SEQ_LEN="${SEQ_LEN:-2048}"
OUT="$WORK/models/${MODEL//\//--}-gptq"
cd "$LESSON_DIR"

module purge
module use /appl/local/laifs/modules
module load lumi-aif-singularity-bindings

export HF_HOME="$WORK/hf-home"
export QUANTLESSON_CACHE="$WORK/quantlesson"
export TRITON_CACHE_DIR="$WORK/triton-cache"
MIOPEN_DIR="$(mktemp -d)"
export MIOPEN_USER_DB="$MIOPEN_DIR/config" MIOPEN_CUSTOM_CACHE_DIR="$MIOPEN_DIR/cache"
mkdir -p "$HF_HOME" "$QUANTLESSON_CACHE" "$WORK/models"

srun singularity exec "$SIF" "$VENV/bin/python" hpc/check_env.py --require-gpu
# One task; inside it, torchrun starts one process per GCD of the node.
srun singularity exec "$SIF" "$VENV/bin/python" -m torch.distributed.run \
    --standalone --nproc-per-node="$GPUS" \
    hpc/quantize.py --distributed --method gptq --model "$MODEL" --out "$OUT" \
    --samples "$SAMPLES" --seq-len "$SEQ_LEN"
# Then one process scores the saved model against the original, each spread over all GCDs of the
# node with device_map="auto" (a 70B model in bfloat16 does not fit one 64 GB GCD).
srun singularity exec "$SIF" "$VENV/bin/python" hpc/quantize.py --evaluate-only --model "$MODEL" --out "$OUT"
