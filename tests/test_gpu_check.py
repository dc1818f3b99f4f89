"""benchmarks/gpu_check.sh, as far as a machine without a GPU can run it: the whole script in
its dry mode (every step on the CPU: preflight, interpreted kernel tests, the engine against
transformers on a tiny random Llama, the kernel benchmark's command line, the report), its
report on a kernel benchmark result shaped as benchmarks/kernel_bench.py writes it, and the GPU
steps' time limits."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_dry_run_passes_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True,
                       text=True, timeout=540, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    merged = json.loads((out / "gpu_check.json").read_text())
    assert merged["dry_run"] is True
    assert merged["preflight"]["torch"] and merged["preflight"]["dry_run"] is True
    assert merged["kernel_tests"]["passed"] >= 3 and merged["kernel_tests"]["failed"] == 0
    cases = merged["engine"]["cases"]
    assert [c["prompt_len"] for c in cases] == [1, 7, 40] * 2 and all(c["ok"] for c in cases)
    assert [r["backend"] for r in merged["engine"]["runs"]] == ["torch", "auto"]
    assert all(c["greedy_tokens_equal"] == 8 for c in cases)  # fp32 on CPU: exactly HF's
    assert "--decode-batches" in merged["kernels"]["dry_run_args"]
    md = (out / "gpu_check.md").read_text()
    assert "| torch (torch) | float32 | 40 |" in md and "dry run" in md


def test_a_missing_piece_fails_early_and_says_what(tmp_path):
    """A failing step stops the script at once with the step's name (here the preflight, told
    to look for a GPU: the script's real mode on this CPU-only machine)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 1
    assert "FAILED at step 'preflight'" in r.stderr and "no CUDA device" in r.stderr
    assert not (tmp_path / "out" / "engine.json").exists()  # nothing after the failure ran


def test_report_renders_a_kernel_benchmark_result(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    kernels = {  # the shape benchmarks/kernel_bench.py writes
        "ceilings": {"matmul_bf16_tflops": 700.0, "copy_gbps": 3900.0},
        "prefill": [{"tokens": 4096, "ours_ms": 1.5, "ours_tflops": 350.0, "sdpa_flash_ms": 1.2,
                     "sdpa_flash_tflops": 430.0, "sdpa_note": "", "config": {"block_m": 128}}],
        "decode": [{"context": 4096, "batch": 1, "num_splits": 8, "ms": 0.02, "bytes": 1 << 24,
                    "gbps": 800.0}],
    }
    (tmp_path / "kernels.json").write_text(json.dumps(kernels))
    (tmp_path / "preflight.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11"}))
    merged = gpu_check.report(tmp_path, dry_run=False)
    assert merged["kernels"] == kernels
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H200" in md and "700 TFLOP/s" in md
    assert "| 4096 | 1.5 | 350 | 1.2 | 430 |" in md and "| 4096 | 1 | 8 | 0.02 |" in md


def test_gpu_steps_fit_in_eight_minutes():
    text = SCRIPT.read_text()
    gpu_part = text[text.index("if [[ ${#DRY[@]} -eq 0 ]]"):text.index("else\n")]
    limits = [int(x) for x in re.findall(r'step (?:\w+|"[^"]+") (\d+)', gpu_part)]
    report = int(re.search(r'step report (\d+)', text).group(1))
    assert len(limits) == 4 and sum(limits) + report <= 480
