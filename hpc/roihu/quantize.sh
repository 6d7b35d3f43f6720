#!/bin/bash
# Roihu: quantize a small model with GPTQ (or AWQ) on ONE GH200 (an H100 GPU with 96 GB),
# then reload it and measure it against the original.
#
#     sbatch hpc/roihu/quantize.sh                                 # from the lesson's folder
#     sbatch --export=ALL,MODEL=Qwen/Qwen2.5-0.5B,METHOD=awq hpc/roihu/quantize.sh  # widths divide by 128
#
# Before the first run: put your project in --account (project_2001234 is a placeholder) and
# make the venv once with hpc/roihu/setup-venv.sh. For a quick test use --partition=gputest.
#SBATCH --job-name=quantize
#SBATCH --account=project_2001234
#SBATCH --partition=gpumedium
#SBATCH --time=00:30:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=72
#SBATCH --gres=gpu:gh200:1
#SBATCH --output=%x-%j.out
set -euo pipefail

PROJECT="${SLURM_JOB_ACCOUNT:?submit this script with sbatch}"
LESSON_DIR="${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
WORK="${LESSON_WORK:-/scratch/$PROJECT/$USER/quant-lesson}"
VENV="${LESSON_VENV:-/projappl/$PROJECT/$USER/venvs/quant-lesson}"
MODEL="${MODEL:-embedded}"
METHOD="${METHOD:-gptq}"
SAMPLES="${SAMPLES:-128}"
SEQ_LEN="${SEQ_LEN:-512}"
OUT="$WORK/models/${MODEL//\//--}-$METHOD"
cd "$LESSON_DIR"

module purge
module load python-pytorch/2.10
# shellcheck source=/dev/null
source "$VENV/bin/activate"

# Models, data sets and the embedded model go to scratch, not to the 15 GiB home directory.
export HF_HOME="$WORK/hf-home"
export QUANTLESSON_CACHE="$WORK/quantlesson"
export TRITON_CACHE_DIR="$WORK/triton-cache"
mkdir -p "$HF_HOME" "$QUANTLESSON_CACHE" "$WORK/models" "$WORK/results"

srun python hpc/check_env.py --require-gpu
srun python hpc/quantize.py \
    --method "$METHOD" --model "$MODEL" --out "$OUT" \
    --samples "$SAMPLES" --seq-len "$SEQ_LEN" \
    --evaluate --results "$WORK/results/hpc.csv"
