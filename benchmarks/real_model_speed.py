"""TTFT and decode speed of the real default model (SmolLM2-135M-Instruct, float32) in sp-serve
at SP = 1 and 2 against Hugging Face transformers' `generate` on the same prompts and threads.

    python benchmarks/real_model_speed.py [--lengths 1024 4096 8000] [--new-tokens 64] [--json out.json]

sp-serve: one torch thread per rank, the fcfs scheduler with a step budget that holds the
prompt (one prefill step), one request at a time, timed at each engine step's token.
transformers: `generate` (greedy, KV cache, SDPA attention) with as many threads as sp-serve
has ranks, timed by a streamer at each token. TTFT = request start to first token; decode
tok/s = (new tokens - 1) / (last token - first token). Prefill GFLOP/s counts 2 FLOP per
weight per token plus causal attention (4·d per query-key pair and head); decode GB/s counts
the weights read once per token. It measures and prints; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sp_serve import LLM, SamplingParams
from sp_serve.bench.passkey import passkey_prompt, random_key
from sp_serve.model import load_spec, load_tokenizer
from sp_serve.model.gguf import gguf_checkpoint
from sp_serve.model.source import default_model


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8000])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def prefill_flop(spec, n: int) -> float:
    dense = spec.num_params - spec.vocab_size * spec.hidden_size  # embedding lookup is no matmul
    attention = 4 * spec.head_dim * spec.num_heads * spec.num_layers * n * (n + 1) / 2
    return 2 * dense * n + attention


def _figures(spec, n: int, stamps: list[float], start: float) -> dict:
    ttft = stamps[0] - start
    decode_s = stamps[-1] - stamps[0]
    per_token = decode_s / (len(stamps) - 1)
    weight_bytes = spec.num_params * torch.finfo(spec.dtype).bits // 8
    return {"prompt_tokens": n, "ttft_s": ttft, "decode_tok_s": 1 / per_token,
            "prefill_gflop_s": prefill_flop(spec, n) / ttft / 1e9,
            "decode_weight_gb_s": weight_bytes / per_token / 1e9}


def run_sp_serve(ckpt: Path, sp: int, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    spec = load_spec(ckpt)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    out = []
    with LLM(str(ckpt), sp_size=sp, scheduler="fcfs", max_num_batched_tokens=max(map(len, prompts)) + 64,
             cpu_threads=1) as llm:
        llm.generate([prompts[0][:256]], SamplingParams(max_tokens=4))  # warm-up
        for i, ids in enumerate(prompts):
            start = time.perf_counter()
            llm.engine.add_request(f"r{i}", ids, params)
            stamps = []
            while llm.engine.has_unfinished():
                for event in llm.engine.step():
                    if event.sample is not None:
                        stamps.append(time.perf_counter())
            out.append(_figures(spec, len(ids), stamps, start))
            print(f"sp-serve SP={sp}: {out[-1]}", flush=True)
    return out


def run_hf(ckpt: Path, threads: int, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):  # first call: the prompt; then one call per new token
            self.calls += 1
            if self.calls > 1:
                self.times.append(time.perf_counter())

        def end(self):
            pass

    torch.set_num_threads(threads)
    spec = load_spec(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = []
    for ids in [prompts[0][:256]] + prompts:  # the first is a warm-up
        stamps = Stamps()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, streamer=stamps,
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        out.append(_figures(spec, len(ids), stamps.times, start))
    print(f"transformers, {threads} threads: {out[1:]}", flush=True)
    return out[1:]


def main() -> None:
    args = _args()
    ckpt = gguf_checkpoint(default_model().path)
    tok = load_tokenizer(ckpt)
    prompts = [passkey_prompt(tok, n, 0.5, random_key(n)) for n in args.lengths]
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                           "load_avg_start": os.getloadavg()}, "runs": {}}
    for sp in args.sp:
        results["runs"][f"sp{sp}"] = run_sp_serve(ckpt, sp, prompts, args.new_tokens)
        results["runs"][f"hf{sp}"] = run_hf(ckpt, sp, prompts, args.new_tokens)
    results["machine"]["load_avg_end"] = os.getloadavg()
    print("\n| prompt | run | TTFT s | prefill GFLOP/s | decode tok/s | decode GB/s |\n|---|---|---|---|---|---|")
    for i in range(len(args.lengths)):
        for sp in args.sp:
            for name, label in ((f"sp{sp}", f"sp-serve SP={sp} ({sp}x1 thread)"),
                                (f"hf{sp}", f"transformers ({sp} thread{'s' if sp > 1 else ''})")):
                r = results["runs"][name][i]
                print(f"| {r['prompt_tokens']} | {label} | {r['ttft_s']:.2f} | {r['prefill_gflop_s']:.1f} | "
                      f"{r['decode_tok_s']:.1f} | {r['decode_weight_gb_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
