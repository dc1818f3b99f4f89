#!/usr/bin/env bash
# One node, N GPUs: every GPU is one sequence-parallel rank (NCCL for tensors, gloo for control).
# Rank 0 runs the engine and the HTTP server; the other ranks execute its step plans.
#   MODEL=/path/to/hf-checkpoint NGPUS=8 bash launch/single_node.sh
set -euo pipefail
: "${MODEL:?set MODEL to a Hugging Face checkpoint directory}"
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec torchrun --standalone --nproc-per-node "$NGPUS" -m sp_serve.cli serve \
  --model "$MODEL" --host 0.0.0.0 --port "${PORT:-8000}" --max-model-len "${MAX_MODEL_LEN:-1048576}" \
  --tbt-slo-ms "${TBT_SLO_MS:-100}" --ttft-slo-ms "${TTFT_SLO_MS:-5000}" "$@"
