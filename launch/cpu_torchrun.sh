#!/usr/bin/env bash
# The same torchrun path on CPU ranks (gloo), e.g. to try multi-process launching without GPUs:
#   bash launch/cpu_torchrun.sh 2 --prompt "hello" --max-tokens 8
set -euo pipefail
N=${1:-2}; shift || true
exec torchrun --standalone --nproc-per-node "$N" -m sp_serve.cli generate --device cpu --cpu-threads 1 "$@"
