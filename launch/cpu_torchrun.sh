#!/usr/bin/env bash
# The same torchrun path on CPU ranks (gloo), e.g. to try multi-process launching without GPUs:
#   bash launch/cpu_torchrun.sh 2 --prompt "hello" --max-tokens 8
# N ranks in all: TP (default 1) consecutive ranks share each layer (tensor parallelism) and
# SP = N / TP groups of them share the sequence; the world size must equal TP x SP, e.g.
#   TP=2 bash launch/cpu_torchrun.sh 4 --prompt "hello" --max-tokens 8   # TP 2 x SP 2
set -euo pipefail
N=${1:-2}; shift || true
TP=${TP:-1}
if (( TP < 1 || N % TP != 0 )); then
  echo "launch/cpu_torchrun.sh: TP=$TP must divide the $N ranks (the world size must equal TP x SP)" >&2
  exit 2
fi
exec torchrun --standalone --nproc-per-node "$N" -m sp_serve.cli generate --device cpu --cpu-threads 1 \
  --tensor-parallel-size "$TP" --sp-size "$(( N / TP ))" "$@"
