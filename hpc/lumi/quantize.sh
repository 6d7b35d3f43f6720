#!/bin/bash
# LUMI: quantize a small model with GPTQ (or AWQ) on ONE GCD -- half an MI250X, which Slurm
# counts as one GPU with 64 GB -- then reload it and measure it against the original.
#
#     sbatch hpc/lumi/quantize.sh                                  # from the lesson's folder
#     sbatch --export=ALL,MODEL=Qwen/Qwen2.5-0.5B,METHOD=awq hpc/lumi/quantize.sh  # widths divide by 128
#
# Before the first run: put your project in --account (project_462000000 is a placeholder)
# and make the venv once with hpc/lumi/setup-venv.sh. For a quick test use --partition=dev-g.
#SBATCH --job-name=quantize
#SBATCH --account=project_462000000
#SBATCH --partition=small-g
#SBATCH --time=00:30:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=7
#SBATCH --gpus-per-node=1
#SBATCH --mem-per-gpu=60G
#SBATCH --output=%x-%j.out
set -euo pipefail

PROJECT="${SLURM_JOB_ACCOUNT:?submit this script with sbatch}"
LESSON_DIR="${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
WORK="${LESSON_WORK:-/scratch/$PROJECT/$USER/quant-lesson}"
VENV="${LESSON_VENV:-/project/$PROJECT/$USER/venvs/quant-lesson}"
SIF="${LESSON_SIF:-/appl/local/laifs/containers/lumi-multitorch-latest.sif}"
MODEL="${MODEL:-embedded}"
METHOD="${METHOD:-gptq}"
SAMPLES="${SAMPLES:-128}"
SEQ_LEN="${SEQ_LEN:-512}"
OUT="$WORK/models/${MODEL//\//--}-$METHOD"
cd "$LESSON_DIR"

module purge
module use /appl/local/laifs/modules
module load lumi-aif-singularity-bindings

# Models, data sets and the embedded model go to scratch, not to the 20 GB home directory.
export HF_HOME="$WORK/hf-home"
export QUANTLESSON_CACHE="$WORK/quantlesson"
export TRITON_CACHE_DIR="$WORK/triton-cache"
# MIOpen (AMD's cuDNN) keeps its kernel database per job, as the LUMI AI guide recommends.
MIOPEN_DIR="$(mktemp -d)"
export MIOPEN_USER_DB="$MIOPEN_DIR/config" MIOPEN_CUSTOM_CACHE_DIR="$MIOPEN_DIR/cache"
mkdir -p "$HF_HOME" "$QUANTLESSON_CACHE" "$WORK/models" "$WORK/results"

# The venv's python inside the container: the container's PyTorch plus the lesson's packages.
srun singularity exec "$SIF" "$VENV/bin/python" hpc/check_env.py --require-gpu
srun singularity exec "$SIF" "$VENV/bin/python" hpc/quantize.py \
    --method "$METHOD" --model "$MODEL" --out "$OUT" \
    --samples "$SAMPLES" --seq-len "$SEQ_LEN" \
    --evaluate --results "$WORK/results/hpc.csv"
