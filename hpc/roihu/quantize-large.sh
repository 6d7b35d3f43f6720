#!/bin/bash
# Roihu: quantize a LARGE model with GPTQ on a whole GPU node (4 GH200: 4 x 96 GiB of GPU memory,
# 4 x 120 GiB of CPU memory). llm-compressor keeps the unquantized model in CPU memory and onloads
# one decoder layer at a time to a GPU ("sequential onloading"), so even one GPU could do it;
# with torchrun, 4 processes (one per GPU) share the calibration samples and the GPTQ work.
#
#     sbatch --export=ALL,MODEL=meta-llama/Llama-3.3-70B-Instruct hpc/roihu/quantize-large.sh
#
# The model must be in $HF_HOME already (download it first: see the lesson page) or be
# downloadable from the compute node. The default, the embedded model, only shows the mechanics.
# Put your project in --account (project_2001234 is a placeholder).
#SBATCH --job-name=quantize-large
#SBATCH --account=project_2001234
#SBATCH --partition=gpumedium
#SBATCH --time=04:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=288
#SBATCH --gres=gpu:gh200:4
#SBATCH --output=%x-%j.out
set -euo pipefail

PROJECT="${SLURM_JOB_ACCOUNT:?submit this script with sbatch}"
GPUS="${SLURM_GPUS_ON_NODE:?submit this script with sbatch}"
LESSON_DIR="${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
WORK="${LESSON_WORK:-/scratch/$PROJECT/$USER/quant-lesson}"
VENV="${LESSON_VENV:-/projappl/$PROJECT/$USER/venvs/quant-lesson}"
MODEL="${MODEL:-embedded}"
SAMPLES="${SAMPLES:-512}"
SEQ_LEN="${SEQ_LEN:-2048}"
OUT="$WORK/models/${MODEL//\//--}-gptq"
cd "$LESSON_DIR"

module purge
module load python-pytorch/2.10
# shellcheck source=/dev/null
source "$VENV/bin/activate"

export HF_HOME="$WORK/hf-home"
export QUANTLESSON_CACHE="$WORK/quantlesson"
export TRITON_CACHE_DIR="$WORK/triton-cache"
mkdir -p "$HF_HOME" "$QUANTLESSON_CACHE" "$WORK/models"

srun python hpc/check_env.py --require-gpu
# One task; inside it, torchrun starts one process per GPU of the node.
srun python -m torch.distributed.run \
    --standalone --nproc-per-node="$GPUS" \
    hpc/quantize.py --distributed --method gptq --model "$MODEL" --out "$OUT" \
    --samples "$SAMPLES" --seq-len "$SEQ_LEN"
# Then one process scores the saved model against the original, each spread over all GPUs of the
# node with device_map="auto" (a 70B model in bfloat16 does not fit one 96 GB GPU).
srun python hpc/quantize.py --evaluate-only --model "$MODEL" --out "$OUT"
