"""Preemption by swap to host against recompute, on the real default model, on this machine: a
burst of long prompts into a KV pool too small for all of them to decode together, so the
newest are preempted; per mode, TTFT and E2E (p50, p99), output throughput, preemptions and
swaps, and the prompt tokens prefilled (a recompute prefills a victim's prompt and outputs
again). The machine's device -> host copy rate is measured beside it (what a swap costs).

    python benchmarks/swap_vs_recompute.py [--json benchmarks/swap/swap_vs_recompute.json]

Both modes run the same requests, all arriving at once, greedy, EOS ignored, the fcfs scheduler
(one policy for both; a swap is chosen whenever the host pool has room), SP 1 by default.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from sp_serve import LLM, SamplingParams
from sp_serve.bench.passkey import passkey_prompt, random_key
from sp_serve.engine.runtime import copy_bandwidth


def run(mode: str, args, prompts: list[list[int]], params: SamplingParams) -> dict:
    extra = dict(kv_offloading_size=2**30) if mode == "swap" else {}
    with LLM(sp_size=args.sp, scheduler="fcfs", cpu_threads=args.cpu_threads,
             max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
             kv_cache_memory=args.pool_tokens * 46080 // args.sp, preemption_mode=mode,
             **extra) as llm:
        engine = llm.engine
        schedule, prefilled = engine.scheduler.schedule, [0]

        def counting_schedule():  # prompt tokens prefilled, recomputations included
            step = schedule()
            prefilled[0] += sum(end - start for _, start, end in step.prefill)
            return step

        engine.scheduler.schedule = counting_schedule
        t0 = time.perf_counter()
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), ids, params, arrival_time=time.monotonic())
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        tokens = 0
        while engine.has_unfinished():
            events = engine.step()
            now = time.perf_counter() - t0
            for ev in events:
                rid = ev.seq.request_id
                if ev.sample is not None:
                    tokens += 1
                    first.setdefault(rid, now)
                if ev.finished:
                    done[rid] = now
        duration = time.perf_counter() - t0
        blocks = engine.blocks
        ttft = np.array([first[str(i)] for i in range(len(prompts))])
        e2e = np.array([done[str(i)] for i in range(len(prompts))])
        return {
            "mode": mode, "duration_s": duration, "output_tokens": tokens,
            "output_throughput_tok_s": tokens / duration,
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "e2e_p50_s": float(np.percentile(e2e, 50)),
            "e2e_p99_s": float(np.percentile(e2e, 99)),
            "num_preemptions": engine.scheduler.num_preemptions,
            "num_swapped_out": blocks.num_swapped_out,
            "swapped_out_blocks": blocks.swapped_out_blocks,
            "prompt_tokens_prefilled": prefilled[0],
            "kv_blocks_per_rank": engine.runtime.num_blocks,
            "host_blocks_per_rank": engine.runtime.host_blocks,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=1500)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--pool-tokens", type=int, default=4800,
                   help="KV pool in tokens over all ranks (fp32 SmolLM2: 46080 bytes a token)")
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch
    bandwidth = copy_bandwidth(torch.device("cpu"), 256 << 20)
    print(f"device -> host copy (CPU memcpy, 256 MiB): {bandwidth / 1e9:.2f} GB/s", flush=True)
    from sp_serve.model.gguf import gguf_checkpoint
    from sp_serve.model.loader import load_tokenizer
    from sp_serve.model.source import default_model
    tok = load_tokenizer(gguf_checkpoint(default_model().path))
    prompts = [passkey_prompt(tok, args.prompt_len, 0.5, random_key(i)) for i in
               range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    rows = []
    for mode in ("recompute", "swap"):
        row = run(mode, args, prompts, params)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(args), "copy_bandwidth_bytes_s": bandwidth, "runs": rows},
                      fh, indent=1)


if __name__ == "__main__":
    main()
