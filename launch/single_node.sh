#!/usr/bin/env bash
# One node, N GPUs: every GPU is one sequence-parallel rank (NCCL for tensors, gloo for control).
# Rank 0 runs the engine and the HTTP server; the other ranks execute its step plans.
#   MODEL=/path/to/hf-checkpoint NGPUS=8 bash launch/single_node.sh
# The context defaults to the model's own (max_position_embeddings, stretched by its RoPE
# scaling); MAX_MODEL_LEN caps it lower. To serve past it, add a RoPE override, e.g.
#   ... bash launch/single_node.sh --max-model-len 262144 \
#       --hf-overrides '{"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 131072}}'
# Stop it with SIGTERM (or Ctrl-C): rank 0 drains (--shutdown-timeout), then stops every rank and
# logs "stopped: every rank is down; exit code 0"; torchrun itself exits 1 after any signal.
set -euo pipefail
: "${MODEL:?set MODEL to a Hugging Face checkpoint directory or a .gguf file}"
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec torchrun --standalone --nproc-per-node "$NGPUS" -m sp_serve.cli serve \
  --model "$MODEL" --host 0.0.0.0 --port "${PORT:-8000}" ${MAX_MODEL_LEN:+--max-model-len "$MAX_MODEL_LEN"} \
  --tbt-slo-ms "${TBT_SLO_MS:-100}" --ttft-slo-ms "${TTFT_SLO_MS:-5000}" "$@"
