#!/usr/bin/env bash
# One-shot check of sp-serve on one GPU (H100/H200; torch >= 2.11, Triton >= 3.6), as it is,
# with no package registry: under 8 minutes, and it stops at the first failure, saying what.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]             # default OUT_DIR: gpu_check_out
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]   # the same steps on the CPU, tiny sizes
#
# 1. preflight      a CUDA GPU with ~24 GiB free, torch/Triton/transformers/pytest importable,
#                   sp_serve and its kernels imported from this checkout
# 2. kernel tests   tests/test_kernels.py compiled for the GPU (TRITON_INTERPRET=0) against the
#                   float64 references
# 3. engine vs HF   the engine at SP=1 (one rank, NCCL) against transformers on a random ~1B
#                   Llama at prompt lengths 1..4000: triton fp32, torch fp32, auto bf16; and no
#                   Triton compile while serving (benchmarks/gpu_check.py engine)
# 4. kernel bench   benchmarks/kernel_bench.py --check: ceilings, prefill TFLOP/s vs SDPA flash,
#                   paged decode GB/s vs copy bandwidth
# 5. report         OUT_DIR/gpu_check.json (everything) and OUT_DIR/gpu_check.md (the tables)
#
# The dry run is what tests/test_gpu_check.py runs on the CPU: every step but the GPU itself
# (Triton's interpreter, a tiny model, gloo; the kernel benchmark's command line parsed only).
# Record the figures of a real run in benchmarks/NOTES.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); shift; fi
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"

# This checkout's code, whatever else is installed: sp_serve from the root, and the kernels/
# folder under its installed name sp_serve_kernels (a link in a scratch directory).
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
ln -s "$PWD/kernels" "$SHIM/sp_serve_kernels"
export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# The kernel benchmark, sized to fit the 8 minutes (the full table: benchmarks/NOTES.md).
KERNEL_BENCH_ARGS=(--check --rep-ms 100 --prefill-tokens 4096 16384 65536
                   --decode-contexts 4096 32768 131072 --decode-batches 1 16 64)

# Step limits on the GPU add up to 470 s (tests/test_gpu_check.py holds them under 480).
started=$SECONDS
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit; stop the check on failure
  local name=$1 limit=$2; shift 2
  echo "== gpu_check: $name (at most ${limit} s; $((SECONDS - started)) s so far)"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  if [[ $rc -ne 0 ]]; then
    [[ $rc -eq 124 || $rc -eq 137 ]] && echo "gpu_check: FAILED: $name ran past ${limit} s" >&2
    echo "gpu_check: FAILED at step '$name' (exit code $rc); results so far in $OUT" >&2
    exit 1
  fi
}

if [[ ${#DRY[@]} -eq 0 ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  step preflight 30 env TRITON_INTERPRET=0 "$PY" benchmarks/gpu_check.py preflight --out "$OUT"
  step "kernel tests (compiled)" 180 env TRITON_INTERPRET=0 \
    "$PY" benchmarks/gpu_check.py kernel-tests --out "$OUT" -- -x
  step "engine vs transformers" 150 env TRITON_INTERPRET=0 \
    "$PY" benchmarks/gpu_check.py engine --out "$OUT"
  step "kernel benchmark" 90 env TRITON_INTERPRET=0 \
    "$PY" benchmarks/kernel_bench.py "${KERNEL_BENCH_ARGS[@]}" --json "$OUT/kernels.json"
else
  step preflight 60 env TRITON_INTERPRET=1 "$PY" benchmarks/gpu_check.py preflight --out "$OUT" "${DRY[@]}"
  # A few interpreted kernel cases (the whole file is CI's): the runner and its report.
  step "kernel tests (interpreted)" 300 env TRITON_INTERPRET=1 \
    "$PY" benchmarks/gpu_check.py kernel-tests --out "$OUT" "${DRY[@]}" -- -x -k "all_empty or merge_decode_layout or bad_shapes"
  step "engine vs transformers" 300 env TRITON_INTERPRET=1 \
    "$PY" benchmarks/gpu_check.py engine --out "$OUT" "${DRY[@]}"
  step "kernel benchmark (command line only)" 60 \
    "$PY" benchmarks/gpu_check.py kernels-dry --out "$OUT" -- "${KERNEL_BENCH_ARGS[@]}" --json "$OUT/kernels.json"
fi
step report 20 "$PY" benchmarks/gpu_check.py report --out "$OUT" "${DRY[@]}"
echo "== gpu_check: passed in $((SECONDS - started)) s; $OUT/gpu_check.md:"
cat "$OUT/gpu_check.md"
