#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
exec python3 -m pytest -q tests "$@"
