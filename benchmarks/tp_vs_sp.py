"""Tensor parallelism against sequence parallelism on this machine, one thread per rank.

    python benchmarks/tp_vs_sp.py [--grid 1,1 2,1 1,2] [--prompt-len 7179] [--json out.json]

The model: a random checkpoint of SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, vocab
49152, tied embeddings, q/k/v widths 576/192/192) with 12 query heads and 4 KV heads of 48
instead of 9 and 3 of 64 (the same weights and FLOPs; 9 heads do not split over 2 ranks),
written once under $SP_SERVE_CACHE. For each (TP, SP) of --grid, one engine (fcfs, a token
budget above the prompt: a prompt is one step, no prefix caching):
  - weight bytes of rank 0's share, and every rank's peak resident memory (VmHWM, mapped
    checkpoint pages included) after start-up and after the run, and its own (RssAnon);
  - TTFT of one --prompt-len prompt alone (best of --reps);
  - decode steps of batch 1 and 8 at ~600 tokens of context each (median of --reps), as
    tokens/s.
It prints a table and writes JSON; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from long_prompt import step_times, ttft

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=12,
             num_key_value_heads=4, head_dim=48, vocab_size=49152, tie_word_embeddings=True,
             max_position_embeddings=8192)


def checkpoint() -> Path:
    from sp_serve.model.cache import cache_root
    out = cache_root() / "bench" / "smollm2-shape-12x48-heads"
    if not (out / "config.json").is_file():
        from sp_serve.model.tiny import build_hf_model
        build_hf_model("llama", 0, **SHAPE).save_pretrained(out)
    return out


def memory_mib(pids: list[int], field: str) -> list[float]:
    """A /proc/PID/status field of each process, MiB: VmHWM (peak resident set, file pages
    included: safetensors maps the checkpoint) or RssAnon (resident memory of its own)."""
    out = []
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            line = next(ln for ln in f if ln.startswith(field + ":"))
        out.append(int(line.split()[1]) / 1024)
    return out


def reset_peak_rss() -> None:
    """This process's VmHWM restarts from its current resident set (Linux clear_refs 5): rank 0
    is this process, which ran the previous grid point."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run(model: Path, tp: int, sp: int, prompt: list[int], reps: int) -> dict:
    from sp_serve import LLM
    reset_peak_rss()
    llm = LLM(str(model), tensor_parallel_size=tp, sp_size=sp, scheduler="fcfs", cpu_threads=1,
              max_num_batched_tokens=max(8192, len(prompt)), enable_prefix_caching=False)
    try:
        engine = llm.engine
        pids = [os.getpid()] + [p.pid for p in engine._procs]
        res: dict = {"tp": tp, "sp": sp, "weight_bytes_rank0": engine.runtime.weight_bytes,
                     "peak_rss_mib_after_start": memory_mib(pids, "VmHWM")}
        res["ttft_s"] = min(ttft(llm, prompt) for _ in range(reps))
        steps = step_times(engine, reps)
        res["decode_b1_step_s"] = steps["decode_b1_ctx600"]
        res["decode_b8_step_s"] = steps["decode_b8_ctx600"]
        res["decode_b1_tok_s"] = 1 / steps["decode_b1_ctx600"]
        res["decode_b8_tok_s"] = 8 / steps["decode_b8_ctx600"]
        res["peak_rss_mib_after_run"] = memory_mib(pids, "VmHWM")
        res["rss_anon_mib_after_run"] = memory_mib(pids, "RssAnon")
    finally:
        llm.shutdown()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", nargs="+", default=["1,1", "2,1", "1,2"], help="TP,SP pairs")
    p.add_argument("--prompt-len", type=int, default=7179)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("results/tp_vs_sp.json"))
    args = p.parse_args()
    model = checkpoint()
    prompt = [(17 * i + 5) % (SHAPE["vocab_size"] - 10) + 5 for i in range(args.prompt_len)]
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "load_avg_at_start": os.getloadavg()}
    print(f"model {model}; {args.prompt_len}-token prompt; machine {machine}", flush=True)
    runs = []
    for pair in args.grid:
        tp, sp = (int(x) for x in pair.split(","))
        runs.append(run(model, tp, sp, prompt, args.reps))
        print(json.dumps(runs[-1]), flush=True)
    print(f"\n{'':32}" + "".join(f"{'TP=%d SP=%d' % (r['tp'], r['sp']):>14}" for r in runs))
    rows = [("weights, rank 0 (MiB)", lambda r: r["weight_bytes_rank0"] / 2**20),
            ("peak RSS, rank 0 (MiB)", lambda r: r["peak_rss_mib_after_run"][0]),
            ("peak RSS, max rank (MiB)", lambda r: max(r["peak_rss_mib_after_run"])),
            ("anonymous RSS, max rank (MiB)", lambda r: max(r["rss_anon_mib_after_run"])),
            (f"TTFT {args.prompt_len} tokens (s)", lambda r: r["ttft_s"]),
            ("decode b1 (tok/s)", lambda r: r["decode_b1_tok_s"]),
            ("decode b8 (tok/s)", lambda r: r["decode_b8_tok_s"])]
    for label, get in rows:
        print(f"{label:32}" + "".join(f"{get(r):14.2f}" for r in runs))
    base = next((r for r in runs if (r["tp"], r["sp"]) == (1, 1)), None)
    if base:
        for r in runs:
            if r is not base:
                print(f"TP={r['tp']} SP={r['sp']}: weights {r['weight_bytes_rank0'] / base['weight_bytes_rank0']:.3f}x "
                      f"of TP=1, TTFT speed-up {base['ttft_s'] / r['ttft_s']:.2f}x, decode b1 "
                      f"{r['decode_b1_tok_s'] / base['decode_b1_tok_s']:.2f}x, b8 "
                      f"{r['decode_b8_tok_s'] / base['decode_b8_tok_s']:.2f}x")
    out = {"model": str(model), "shape": SHAPE, "prompt_len": args.prompt_len, "machine": machine,
           "runs": runs, "load_avg_at_end": os.getloadavg()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
