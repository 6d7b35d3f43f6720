#!/bin/bash
# LUMI: serve a quantized model with vLLM, split over 2 GCDs with tensor parallelism, on a
# Unix socket that only you can reach. The job checks the server with one request, then keeps
# serving until its time runs out; talk to it from a shell on the same node:
#
#     sbatch hpc/lumi/serve-vllm.sh                    # serves the model quantize.sh made
#     srun --overlap --jobid <job id> --pty bash       # then the curl command the log prints
#
# Put your project in --account (project_462000000 is a placeholder).
#SBATCH --job-name=serve-vllm
#SBATCH --account=project_462000000
#SBATCH --partition=small-g
#SBATCH --time=01:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=14
#SBATCH --gpus-per-node=2
#SBATCH --mem-per-gpu=60G
#SBATCH --output=%x-%j.out
set -euo pipefail

PROJECT="${SLURM_JOB_ACCOUNT:?submit this script with sbatch}"
GPUS="${SLURM_GPUS_ON_NODE:?submit this script with sbatch}"
JOB_ID="${SLURM_JOB_ID:?submit this script with sbatch}"
WORK="${LESSON_WORK:-/scratch/$PROJECT/$USER/quant-lesson}"
SIF="${LESSON_SIF:-/appl/local/laifs/containers/lumi-multitorch-latest.sif}"
MODEL_DIR="${MODEL_DIR:-$WORK/models/embedded-gptq}"
SOCKET="${TMPDIR:-/tmp}/vllm-$JOB_ID.sock"

module purge
module use /appl/local/laifs/modules
module load lumi-aif-singularity-bindings

export HF_HOME="$WORK/hf-home"
export VLLM_CACHE_ROOT="$WORK/vllm-cache"
export TRITON_CACHE_DIR="$WORK/triton-cache"
MIOPEN_DIR="$(mktemp -d)"
export MIOPEN_USER_DB="$MIOPEN_DIR/config" MIOPEN_CUSTOM_CACHE_DIR="$MIOPEN_DIR/cache"
# vLLM looks for HIP_VISIBLE_DEVICES; Slurm sets ROCR_VISIBLE_DEVICES (CSC's LUMI examples do this).
if [[ -n "${ROCR_VISIBLE_DEVICES:-}" ]]; then
    export HIP_VISIBLE_DEVICES="$ROCR_VISIBLE_DEVICES"
fi

# Tensor parallelism: every layer is split over the job's GCDs, which must divide the model's
# attention heads and leave each GCD whole quantization groups (hpc/plan.py checks a model).
srun singularity run "$SIF" vllm serve "$MODEL_DIR" \
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
