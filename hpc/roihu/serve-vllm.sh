#!/bin/bash
# Roihu: serve a quantized model with vLLM, split over 2 GH200 with tensor parallelism, on a
# Unix socket that only you can reach. The job checks the server with one request, then keeps
# serving until its time runs out; talk to it from a shell on the same node:
#
#     sbatch hpc/roihu/serve-vllm.sh                   # serves the model quantize.sh made
#     srun --overlap --jobid <job id> --pty bash       # then the curl command the log prints
#
# Put your project in --account (project_2001234 is a placeholder).
#SBATCH --job-name=serve-vllm
#SBATCH --account=project_2001234
#SBATCH --partition=gpumedium
#SBATCH --time=01:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=144
#SBATCH --gres=gpu:gh200:2
#SBATCH --output=%x-%j.out
set -euo pipefail

PROJECT="${SLURM_JOB_ACCOUNT:?submit this script with sbatch}"
GPUS="${SLURM_GPUS_ON_NODE:?submit this script with sbatch}"
JOB_ID="${SLURM_JOB_ID:?submit this script with sbatch}"
WORK="${LESSON_WORK:-/scratch/$PROJECT/$USER/quant-lesson}"
MODEL_DIR="${MODEL_DIR:-$WORK/models/embedded-gptq}"
SOCKET="${TMPDIR:-/tmp}/vllm-$JOB_ID.sock"

# CSC's vLLM module (https://docs.csc.fi/apps/vllm/); the venv is not needed to serve.
module purge
module load python-vllm/0.19.1

export HF_HOME="$WORK/hf-home"
export VLLM_CACHE_ROOT="$WORK/vllm-cache"
export TRITON_CACHE_DIR="$WORK/triton-cache"

# Tensor parallelism: every layer is split over the job's GPUs, which must divide the model's
# attention heads and leave each GPU whole quantization groups (hpc/plan.py checks a model).
srun vllm serve "$MODEL_DIR" \
    --served-model-name lesson-model \
    --tensor-parallel-size "$GPUS" \
    --uds "$SOCKET" &
SERVER=$!

# Wait (up to 20 minutes) until the server answers, then ask it for one completion.
for _ in $(seq 240); do
    if curl --silent --fail --unix-socket "$SOCKET" http://localhost/health > /dev/null; then
        break
    fi
    if ! kill -0 "$SERVER" 2> /dev/null; then
        echo "vLLM stopped while starting: its messages are above." >&2
        exit 1
    fi
    sleep 5
done
curl --silent --show-error --fail --unix-socket "$SOCKET" http://localhost/v1/completions \
    -H "Content-Type: application/json" \
    -d '{"model": "lesson-model", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}'
echo
echo "Serving $MODEL_DIR on $SOCKET until the job ends. On the node (srun --overlap --jobid $JOB_ID --pty bash):"
echo "  curl --unix-socket $SOCKET http://localhost/v1/completions -H 'Content-Type: application/json' \\"
echo "       -d '{\"model\": \"lesson-model\", \"prompt\": \"import numpy as\", \"max_tokens\": 20}'"
wait "$SERVER"
