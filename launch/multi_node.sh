#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR (node 0's address), NNODES
# and a distinct NODE_RANK. Each node runs NGPUS ranks (default: its GPU count). TP (default 1)
# consecutive ranks share each layer's weights and heads; keep a TP group inside a node (TP
# dividing NGPUS) so its two all-reduces per layer stay on NVLink, and let sequence parallelism
# span the nodes: SP = NNODES x NGPUS / TP. The world size (NNODES x NGPUS) must equal TP x SP.
# Rank 0 (node 0, GPU 0) serves HTTP. NCCL needs the nodes to reach each other on MASTER_PORT
# and on NCCL's own ports; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric, and
# GLOO_SOCKET_IFNAME for the control group.
#   MODEL=... MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 bash launch/multi_node.sh          # SP 16
#   # 2 nodes x 8 GPUs, TP inside each node x SP across them: --tensor-parallel-size 8 --sp-size 2
#   MODEL=... MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 NGPUS=8 TP=8 bash launch/multi_node.sh
# `sp-serve plan -tp 8 -sp 2 ...` prints this line for its plan.
set -euo pipefail
: "${MODEL:?set MODEL}" "${MASTER_ADDR:?set MASTER_ADDR}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
TP=${TP:-1}
WORLD=$(( NNODES * NGPUS ))
if (( TP < 1 || WORLD % TP != 0 )); then
  echo "launch/multi_node.sh: TP=$TP must divide the world size NNODES x NGPUS = $WORLD (it must equal TP x SP)" >&2
  exit 2
fi
if (( NGPUS % TP != 0 )); then
  echo "launch/multi_node.sh: warning: TP=$TP does not divide NGPUS=$NGPUS, so TP groups span nodes and their all-reduces cross the network" >&2
fi
SP=$(( WORLD / TP ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NGPUS" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" -m sp_serve.cli serve \
  --model "$MODEL" --tensor-parallel-size "$TP" --sp-size "$SP" \
  --host 0.0.0.0 --port "${PORT:-8000}" --dist-timeout "${DIST_TIMEOUT:-300}" "$@"
