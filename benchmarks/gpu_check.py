"""The parts of benchmarks/gpu_check.sh written in Python (run by it; see there for the order).

    python benchmarks/gpu_check.py preflight --out DIR [--dry-run]
    python benchmarks/gpu_check.py kernel-tests --out DIR [--dry-run] [-- PYTEST_ARGS]
    python benchmarks/gpu_check.py engine --out DIR [--dry-run]
    python benchmarks/gpu_check.py kernels-dry --out DIR -- KERNEL_BENCH_ARGS
    python benchmarks/gpu_check.py report --out DIR [--dry-run]

preflight  fails at once, naming what is missing: a CUDA device, torch >= 2.11 built with CUDA,
           Triton, transformers, pytest, and sp_serve / sp_serve_kernels imported from this
           checkout (not some other install).
engine     the engine at SP=1 (one rank: NCCL on the GPU) against Hugging Face transformers on
           a random ~1B Llama (16 layers, hidden 2048, 32 heads / 8 KV heads) at several prompt
           lengths, per attention backend and dtype: the first token's top-k logprobs within a
           tolerance of HF's, and the greedy continuation equal to HF's wherever HF's top-2
           margin is not a tie. Also: no Triton compile while serving (every variant compiled
           by the start-up warm-up). Writes DIR/engine.json.
kernel-tests  tests/test_kernels.py, compiled on the GPU (TRITON_INTERPRET=0), results in
           DIR/kernel_tests.json.
kernels-dry   (dry run only) parses the kernel benchmark's command line; on the GPU the script
           runs benchmarks/kernel_bench.py itself, which writes DIR/kernels.json.
report     merges DIR/*.json into DIR/gpu_check.json and a markdown table DIR/gpu_check.md.

--dry-run: the same code on the CPU (a tiny random Llama, short prompts, gloo, Triton's
interpreter), so that everything but the GPU itself is tested (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (backend, dtype, top-k logprob tolerance): fp32 is held tight, bf16 to its rounding.
GPU_CASES = [("triton", "float32", 2e-3), ("torch", "float32", 2e-3), ("auto", "bfloat16", 0.15)]
# Two engines in one process, as on the GPU (the second starts after the first shut down).
DRY_CASES = [("torch", "float32", 1e-4), ("auto", "float32", 1e-4)]
GPU_LENGTHS = [1, 100, 1000, 4000]
DRY_LENGTHS = [1, 7, 40]
NUM_TOKENS = 8
TOP_K = 20
# HF's top-2 margin below which a greedy token that differs from HF's counts as a tie
TIE = {"float32": 1e-3, "bfloat16": 0.1}


def fail(message: str) -> None:
    print(f"gpu_check: FAILED: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


# ---- preflight -------------------------------------------------------------------------------
def preflight(dry_run: bool) -> dict:
    info: dict = {"python": platform.python_version(), "dry_run": dry_run}
    try:
        import torch
    except ImportError as exc:
        fail(f"torch is not importable ({exc})")
    info["torch"] = torch.__version__
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 11):
        fail(f"torch {torch.__version__} is older than 2.11")
    if not dry_run:
        if not torch.cuda.is_available():
            fail(f"no CUDA device visible to torch {torch.__version__} (CUDA build: "
                 f"{torch.version.cuda})")
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        free, total = torch.cuda.mem_get_info()
        info["gpu_free_gib"] = round(free / 2**30, 1)
        if free < 24 * 2**30:
            fail(f"only {free / 2**30:.1f} GiB free on the GPU; the check needs ~24 GiB")
        if not torch.distributed.is_nccl_available():
            fail("this torch has no NCCL")
    for name in ("triton", "transformers", "pytest", "numpy", "safetensors"):
        try:
            module = __import__(name)
        except ImportError as exc:
            fail(f"{name} is not importable ({exc}); no registry is needed if it is installed")
        info[name] = getattr(module, "__version__", "?")
    import sp_serve
    import sp_serve_kernels
    for module in (sp_serve, sp_serve_kernels):
        where = Path(module.__file__).resolve()
        if ROOT not in where.parents:
            fail(f"{module.__name__} is imported from {where}, not from this checkout {ROOT}")
    from sp_serve_kernels import triton_available
    if not triton_available():
        fail("Triton cannot run here (no GPU, and TRITON_INTERPRET is not set)")
    try:
        import flash_attn
        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None  # optional: the auto backend is then triton
    return info


# ---- engine against HF -----------------------------------------------------------------------
def make_checkpoint(path: Path, dry_run: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
             if dry_run else
             dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                  max_position_embeddings=8192))
    config = LlamaConfig(**shape, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    device = "cpu" if dry_run else "cuda"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if not dry_run:
        # Larger weights than the 0.02 default: logits with clear margins, so greedy ties are rare.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.05)
    model = model.to(torch.bfloat16)  # stored in bf16: exact in fp32 for the fp32 runs
    model.save_pretrained(path)
    return {**shape, "parameters": sum(p.numel() for p in model.parameters())}


def hf_references(path: Path, prompts: dict[int, list[int]], dtype, device: str) -> dict:
    """HF's first-token log-softmax and greedy continuation with its per-step top-2 margins,
    per prompt (one model load for all of them)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    refs = {}
    for n, prompt in prompts.items():
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NUM_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0,
                                 attention_mask=torch.ones_like(ids), output_scores=True,
                                 return_dict_in_generate=True)
        scores = [s[0].float() for s in out.scores]
        top2 = [s.topk(2).values for s in scores]
        refs[n] = {"tokens": out.sequences[0, len(prompt):].tolist(),
                   "first_logprobs": torch.log_softmax(scores[0], -1).cpu(),
                   "margins": [float(t[0] - t[1]) for t in top2]}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return refs


def triton_compiled_variants() -> int | None:
    """Compiled variants of sp-serve's Triton kernels so far (None where Triton keeps no such
    cache, e.g. the interpreter)."""
    import importlib
    total = 0
    for module, name in (("decode_attention", "_decode_split_kernel"),
                         ("prefill_attention", "_prefill_kernel"), ("lse_merge", "_merge_kernel")):
        kernel = getattr(importlib.import_module(f"sp_serve_kernels.{module}"), name)
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            return None
        for entry in caches.values():
            total += len(entry[0]) if isinstance(entry, tuple) else len(entry)
    return total


def generate_with_logprobs(engine, prompts: list[list[int]], params) -> list[tuple]:
    """All prompts in one engine (batched as the scheduler likes): per prompt, the greedy
    tokens and the first token's top-k (token, logprob) list."""
    ids = [f"gpu-check-{i}" for i in range(len(prompts))]
    seqs = {}
    for request_id, prompt in zip(ids, prompts):
        (seq,) = engine.add_request(request_id, prompt, params)
        seqs[request_id] = seq
    first: dict[str, list] = {}
    while engine.has_unfinished():
        for event in engine.step():
            if event.error:
                fail(f"request {event.seq.request_id} failed: {event.error}")
            if event.sample is not None and event.seq.request_id not in first:
                first[event.seq.request_id] = event.sample.top
    return [(list(seqs[r].output_token_ids), first[r]) for r in ids]


def engine_check(out_dir: Path, dry_run: bool) -> dict:
    import torch

    from sp_serve import LLM, SamplingParams
    device = "cpu" if dry_run else "cuda"
    cases, lengths = (DRY_CASES, DRY_LENGTHS) if dry_run else (GPU_CASES, GPU_LENGTHS)
    report: dict = {"cases": [], "dry_run": dry_run}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ckpt = Path(tmp) / "llama"
        t0 = time.perf_counter()
        report["model"] = make_checkpoint(ckpt, dry_run)
        report["checkpoint_s"] = round(time.perf_counter() - t0, 1)
        vocab = report["model"]["vocab_size"]
        g = torch.Generator().manual_seed(7)
        prompts = {n: torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths}
        hf: dict = {}
        for backend, dtype_name, tol in cases:
            dtype = getattr(torch, dtype_name)
            if dtype_name not in hf:
                hf[dtype_name] = hf_references(ckpt, prompts, dtype, device)
            refs = hf[dtype_name]
            t0 = time.perf_counter()
            llm = LLM(str(ckpt), sp_size=1, device=device, dtype=dtype_name, attn_backend=backend,
                      scheduler="fcfs", max_model_len=max(lengths) + NUM_TOKENS + 16,
                      max_num_batched_tokens=2048, max_num_seqs=16)
            start_s = time.perf_counter() - t0
            chosen = llm.engine.attn_backend
            compiled_before = triton_compiled_variants()
            params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True,
                                    logprobs=TOP_K)
            t0 = time.perf_counter()
            got = generate_with_logprobs(llm.engine, [prompts[n] for n in lengths], params)
            gen_s = time.perf_counter() - t0
            compiled_after = triton_compiled_variants()
            llm.shutdown()
            for n, (tokens, first) in zip(lengths, got):
                ref = refs[n]
                err = max(abs(lp - float(ref["first_logprobs"][t])) for t, lp in first)
                agree = 0
                while agree < NUM_TOKENS and tokens[agree] == ref["tokens"][agree]:
                    agree += 1
                tie = agree < NUM_TOKENS and ref["margins"][agree] < TIE[dtype_name]
                ok = err <= tol and (agree == NUM_TOKENS or tie)
                report["cases"].append({
                    "backend": backend, "chosen_backend": chosen, "dtype": dtype_name,
                    "prompt_len": n, "logprob_max_err": err, "tolerance": tol,
                    "greedy_tokens_equal": agree, "diverged_on_a_tie": tie, "ok": ok})
            report.setdefault("runs", []).append({
                "backend": backend, "chosen_backend": chosen, "dtype": dtype_name,
                "start_s": round(start_s, 1), "generate_s": round(gen_s, 2),
                "triton_variants_after_warm_up": compiled_before,
                "triton_variants_compiled_while_serving": (
                    None if compiled_before is None else compiled_after - compiled_before)})
    (out_dir / "engine.json").write_text(json.dumps(report, indent=2))
    bad = [c for c in report["cases"] if not c["ok"]]
    recompiled = [r for r in report["runs"] if r["triton_variants_compiled_while_serving"]]
    for c in report["cases"]:
        tie = " (then a tie)" if c["diverged_on_a_tie"] else ""
        print(f"engine {c['backend']:>6} ({c['chosen_backend']}) {c['dtype']:>8} "
              f"len {c['prompt_len']:>5}: logprob err {c['logprob_max_err']:.2e} "
              f"(tol {c['tolerance']:g}), greedy {c['greedy_tokens_equal']}/{NUM_TOKENS}{tie}"
              f"  {'ok' if c['ok'] else 'MISMATCH'}", flush=True)
    if bad:
        fail(f"{len(bad)} engine case(s) differ from transformers (see {out_dir / 'engine.json'})")
    if recompiled:
        fail(f"Triton compiled while serving (the warm-up missed a variant): {recompiled}")
    return report


# ---- kernel unit tests, compiled (or interpreted in a dry run) -------------------------------
def kernel_tests(out_dir: Path, dry_run: bool, pytest_args: list[str]) -> dict:
    """tests/test_kernels.py in this process (TRITON_INTERPRET must be set by the caller before
    anything imports Triton: 0 on the GPU, 1 in a dry run)."""
    import pytest

    class Count:
        def __init__(self):
            self.passed, self.failed, self.failures = 0, 0, []

        def pytest_runtest_logreport(self, report):
            if report.when == "call" and report.passed:
                self.passed += 1
            elif report.failed:
                self.failed += 1
                self.failures.append(report.nodeid)

    count = Count()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_kernels.py"),
                        *pytest_args], plugins=[count])
    result = {"mode": "interpreted (dry run)" if dry_run else "compiled on the GPU",
              "passed": count.passed, "failed": count.failed, "failures": count.failures,
              "exit_code": int(code)}
    (out_dir / "kernel_tests.json").write_text(json.dumps(result, indent=2))
    if code != 0 or count.passed == 0:
        fail(f"tests/test_kernels.py: {count.failed} failed, {count.passed} passed "
             f"(exit code {int(code)})")
    return result


def kernels_dry(out_dir: Path, bench_args: list[str]) -> dict:
    """What of benchmarks/kernel_bench.py runs without a GPU: its import and the exact command line
    gpu_check.sh gives it (a typo there would otherwise surface only on the GPU)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_bench as bench
    args = bench.parse_args(bench_args)
    result = {"dry_run_args": " ".join(bench_args), "args": vars(args)}
    (out_dir / "kernels.json").write_text(json.dumps(result, indent=2))
    return result


# ---- report ----------------------------------------------------------------------------------
def report(out_dir: Path, dry_run: bool) -> dict:
    parts = {}
    for name in ("preflight", "kernel_tests", "engine", "kernels"):
        path = out_dir / f"{name}.json"
        parts[name] = json.loads(path.read_text()) if path.exists() else None
    merged = {"dry_run": dry_run, **parts}
    (out_dir / "gpu_check.json").write_text(json.dumps(merged, indent=2))
    pre = parts["preflight"] or {}
    lines = [f"# gpu_check{' (dry run on CPU)' if dry_run else ''}", "",
             f"device: {pre.get('device', 'cpu')}; torch {pre.get('torch')}, Triton "
             f"{pre.get('triton')}, transformers {pre.get('transformers')}, flash-attn "
             f"{pre.get('flash_attn')}", ""]
    kt = parts["kernel_tests"]
    if kt:
        lines += [f"kernel unit tests ({kt['mode']}): {kt['passed']} passed, "
                  f"{kt['failed']} failed", ""]
    eng = parts["engine"]
    if eng:
        lines += ["## engine (SP=1) vs transformers", "",
                  "| backend | dtype | prompt | top-20 logprob max err | greedy equal | ok |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for c in eng["cases"]:
            lines.append(f"| {c['backend']} ({c['chosen_backend']}) | {c['dtype']} | "
                         f"{c['prompt_len']} | {c['logprob_max_err']:.2e} | "
                         f"{c['greedy_tokens_equal']}/{NUM_TOKENS} | "
                         f"{'yes' if c['ok'] else 'NO'} |")
        lines += ["", "| backend | dtype | start s | generate s | Triton variants compiled "
                  "while serving |", "| --- | --- | ---: | ---: | ---: |"]
        for r in eng["runs"]:
            lines.append(f"| {r['backend']} ({r['chosen_backend']}) | {r['dtype']} | "
                         f"{r['start_s']} | {r['generate_s']} | "
                         f"{r['triton_variants_compiled_while_serving']} |")
        lines.append("")
    kb = parts["kernels"]
    if kb:
        lines += ["## kernels (benchmarks/kernel_bench.py)", ""]
        ceil = kb.get("ceilings", {})
        if ceil:
            lines += [f"ceilings: bf16 matmul {ceil.get('matmul_bf16_tflops', 0):.0f} TFLOP/s, "
                      f"copy {ceil.get('copy_gbps', 0):.0f} GB/s", ""]
        if kb.get("prefill"):
            keys = [k for k in kb["prefill"][0] if k != "tokens"]
            lines += ["| prefill tokens | " + " | ".join(keys) + " |",
                      "| ---: |" + " ---: |" * len(keys)]
            for row in kb["prefill"]:
                lines.append(f"| {row['tokens']} | " + " | ".join(
                    _fmt(v) for k, v in row.items() if k != "tokens") + " |")
            lines.append("")
        if kb.get("decode"):
            keys = list(kb["decode"][0])
            lines += ["| " + " | ".join(keys) + " |", "|" + " ---: |" * len(keys)]
            for row in kb["decode"]:
                lines.append("| " + " | ".join(_fmt(row[k]) for k in keys) + " |")
            lines.append("")
        if kb.get("dry_run_args"):
            lines += [f"(dry run: the benchmark's command line parsed: {kb['dry_run_args']})", ""]
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return merged


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["preflight", "kernel-tests", "engine", "kernels-dry",
                                         "report"])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--dry-run", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    # After "--": pytest's arguments (kernel-tests) or the kernel benchmark's (kernels-dry).
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = parser.parse_args(argv[:cut]), argv[cut + 1:]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "preflight":
        info = preflight(args.dry_run)
        (args.out / "preflight.json").write_text(json.dumps(info, indent=2))
        print("preflight ok: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    elif args.what == "kernel-tests":
        kernel_tests(args.out, args.dry_run, rest)
    elif args.what == "engine":
        engine_check(args.out, args.dry_run)
    elif args.what == "kernels-dry":
        kernels_dry(args.out, rest)
    else:
        report(args.out, args.dry_run)
        print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
