#!/usr/bin/env bash
# One node, N GPUs, one rank each (NCCL for tensors, gloo for control). TP (default 1) GPUs
# share each layer's weights and heads (tensor parallelism, consecutive ranks); the NGPUS / TP
# groups of TP GPUs are the sequence-parallel ranks. The world size must equal TP x SP, so TP
# must divide NGPUS: NGPUS=8 TP=4 runs --tensor-parallel-size 4 --sp-size 2.
# Rank 0 runs the engine and the HTTP server; the other ranks execute its step plans.
#   MODEL=/path/to/hf-checkpoint NGPUS=8 bash launch/single_node.sh           # SP 8
#   MODEL=/path/to/Llama-3.1-70B NGPUS=8 TP=8 bash launch/single_node.sh      # TP 8 x SP 1
# `sp-serve plan --num-gpus 8 -tp 8 4 2 -sp 1 2 4 ...` compares the layouts and prints this line.
# The context defaults to the model's own (max_position_embeddings, stretched by its RoPE
# scaling); MAX_MODEL_LEN caps it lower. To serve past it, add a RoPE override, e.g.
#   ... bash launch/single_node.sh --max-model-len 262144 \
#       --hf-overrides '{"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 131072}}'
# Stop it with SIGTERM (or Ctrl-C): rank 0 drains (--shutdown-timeout), then stops every rank and
# logs "stopped: every rank is down; exit code 0"; torchrun itself exits 1 after any signal.
set -euo pipefail
: "${MODEL:?set MODEL to a Hugging Face checkpoint directory or a .gguf file}"
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
TP=${TP:-1}
if (( TP < 1 || NGPUS % TP != 0 )); then
  echo "launch/single_node.sh: TP=$TP must divide NGPUS=$NGPUS (the world size must equal TP x SP)" >&2
  exit 2
fi
SP=$(( NGPUS / TP ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec torchrun --standalone --nproc-per-node "$NGPUS" -m sp_serve.cli serve \
  --model "$MODEL" --tensor-parallel-size "$TP" --sp-size "$SP" --host 0.0.0.0 --port "${PORT:-8000}" \
  ${MAX_MODEL_LEN:+--max-model-len "$MAX_MODEL_LEN"} \
  --tbt-slo-ms "${TBT_SLO_MS:-100}" --ttft-slo-ms "${TTFT_SLO_MS:-5000}" "$@"
