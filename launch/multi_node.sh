#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR (node 0's address), NNODES
# and a distinct NODE_RANK. The SP degree is NNODES x GPUs per node; rank 0 (node 0, GPU 0) serves
# HTTP. NCCL needs the nodes to reach each other on MASTER_PORT and on NCCL's own ports; set
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric, and GLOO_SOCKET_IFNAME for the control group.
#   MODEL=... MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 bash launch/multi_node.sh
set -euo pipefail
: "${MODEL:?set MODEL}" "${MASTER_ADDR:?set MASTER_ADDR}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NGPUS" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" -m sp_serve.cli serve \
  --model "$MODEL" --host 0.0.0.0 --port "${PORT:-8000}" --dist-timeout "${DIST_TIMEOUT:-300}" "$@"
