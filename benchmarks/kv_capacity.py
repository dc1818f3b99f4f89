"""KV capacity per rank at a fixed --kv-cache-memory for each model dtype x KV cache dtype, as
the engine sizes its pool (the start-up log's and /metrics' figure), on the default model.

    python benchmarks/kv_capacity.py [--kv-cache-memory 1GiB] [--json out.json]

For each pair an engine starts (SP 1, fcfs: no calibration), and the script prints its bytes
per token and rank, its KV blocks and tokens per rank, the ratio to the model-dtype cache of
the same model dtype, and whether the longest prompt it admits (check_prompt) matches.
"""
from __future__ import annotations

import argparse
import json

from sp_serve import LLM, SamplingParams
from sp_serve.config import parse_bytes

DTYPES = ["float32", "bfloat16"]
KV_DTYPES = ["auto", "fp8", "fp8_e5m2", "int8"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=parse_bytes("1GiB"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for dtype in DTYPES:
        base = None
        for kv in KV_DTYPES:
            with LLM(dtype=dtype, kv_cache_dtype=kv, kv_cache_memory=args.kv_cache_memory,
                     scheduler="fcfs", cpu_threads=1, max_model_len=8192) as llm:
                eng = llm.engine
                tokens = eng.kv_capacity_tokens // eng.sp_size
                base = tokens if kv == "auto" else base
                # the pool admits a request of exactly its capacity, and not one token more
                params = SamplingParams(max_tokens=1)
                fits = _admits(eng, tokens - 1, params) and not _admits(eng, tokens, params)
                row = dict(dtype=dtype, kv_cache_dtype=kv, bytes_per_token=eng.kv_bytes_per_token,
                           blocks_per_rank=eng.runtime.num_blocks, tokens_per_rank=tokens,
                           ratio_to_model_dtype=tokens / base, admission_matches=fits)
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"kv_cache_memory": args.kv_cache_memory, "rows": rows}, fh, indent=1)


def _admits(engine, prompt_len: int, params) -> bool:
    if prompt_len + params.max_tokens > engine.max_model_len:
        engine.max_model_len = prompt_len + params.max_tokens  # capacity, not context, is asked
    try:
        engine.check_prompt([1] * prompt_len, params)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
