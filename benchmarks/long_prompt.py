"""A lone long prompt and the cost of a step, at SP=1 and SP=2, one thread per rank.

    python benchmarks/long_prompt.py --model DIR [--prompt-len 7179] [--sp 1 2] [--json out.json]

For each SP size, in one engine per scheduler (both in this process, one after the other):
  - TTFT of one prompt of --prompt-len tokens alone, max_tokens=1: under the default `slo`
    scheduler, and in one pass (`fcfs` with a token budget above the prompt: one step);
  - the slo engine's start-up calibration (the cost model's fixed costs);
  - on the slo engine, a --short-len prompt alone, then the long prompt again with that short
    one (reversed, so nothing is shared) arriving --short-at-s seconds into its prefill: the
    short one's TTFT (it waits for the step in flight, then goes first) and the long one's;
  - measured steps on the fcfs engine: a 1-token prompt chunk, a 1-token chunk after 2048
    cached tokens, and decode steps of batch 1 and 8 at ~600 tokens of context each (median of
    --reps), with and without a 64-token chunk riding along.
It prints a table and writes JSON; it asserts nothing. Default model: the built-in default
(SmolLM2-135M-Instruct: 30 layers, hidden 576, 9/3 heads, intermediate 1536), so per-layer costs
are as a user meets them; --model takes any checkpoint directory or GGUF file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

def step_times(engine, reps: int) -> dict[str, float]:
    """Median seconds of steps of dummy sequences (the engine's own profile helper)."""
    ctx: dict[int, int] = {}
    out: dict[str, float] = {}

    def timed(name, chunks, decode):
        times = []
        for i in range(reps):
            fresh = [(sid - 1000 * (i + 1), a, b) for sid, a, b in chunks]
            for sid, a, _ in fresh:
                if a:
                    engine._profile_step([(sid, 0, a)], [], ctx)
            got: list = []
            engine._profile_step(fresh, decode, ctx, got)
            times.append(got[0][3])
            engine._release_profile([sid for sid, _, _ in fresh])
            for sid, _, _ in fresh:
                ctx.pop(sid, None)
        out[name] = statistics.median(times)

    decoders = [-100 - i for i in range(8)]
    for sid in decoders:
        engine._profile_step([(sid, 0, 600)], [], ctx)
    timed("chunk_1_token", [(-1, 0, 1)], [])
    timed("chunk_1_token_after_2048", [(-2, 2048, 2049)], [])
    timed("chunk_64_tokens", [(-3, 0, 64)], [])
    timed("decode_b1_ctx600", [], decoders[:1])
    timed("decode_b8_ctx600", [], decoders)
    timed("decode_b8_ctx600_with_chunk_64", [(-4, 0, 64)], decoders)
    engine._release_profile(decoders)
    return out


def ttft(llm, prompt: list[int]) -> float:
    from sp_serve import SamplingParams
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return time.perf_counter() - t0


def short_during_long(engine, prompt: list[int], short: list[int], at_s: float) -> dict[str, float]:
    """The long prompt alone, and a short one arriving `at_s` seconds into its prefill: both
    TTFTs (each from its own arrival), driven step by step as the server's loop does."""
    from sp_serve import SamplingParams
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    t0 = time.monotonic()
    engine.add_request("long", prompt, params, arrival_time=t0)
    first: dict[str, float] = {}
    arrived: dict[str, float] = {"long": t0}
    while engine.has_unfinished():
        if "short" not in arrived and time.monotonic() - t0 >= at_s:
            arrived["short"] = time.monotonic()
            engine.add_request("short", short, params, arrival_time=arrived["short"])
        for event in engine.step():
            rid = event.seq.request_id
            if event.sample is not None and rid not in first:
                first[rid] = time.monotonic() - arrived[rid]
    return {"long_ttft_s": first["long"], "short_ttft_s": first.get("short", float("nan")),
            "short_arrived_at_s": arrived.get("short", t0) - t0}


def run_sp(model: str, sp: int, prompt: list[int], reps: int, cpu_comm: str,
           short_len: int, short_at_s: float) -> dict:
    from sp_serve import LLM
    res: dict = {"sp": sp}
    # no prefix caching: the same prompt runs again on the slo engine and must be prefilled again
    common = dict(sp_size=sp, cpu_threads=1, cpu_comm=cpu_comm, enable_prefix_caching=False)
    llm = LLM(model, scheduler="fcfs", max_num_batched_tokens=max(8192, len(prompt)), **common)
    try:
        res["one_pass_ttft_s"] = ttft(llm, prompt)
        res["steps_s"] = step_times(llm.engine, reps)
    finally:
        llm.shutdown()
    llm = LLM(model, **common)  # the defaults: slo, calibrated at start-up
    try:
        res["cost_model"] = asdict(llm.engine.scheduler.cost)
        records: list[dict] = []
        llm.engine.scheduler.step_observer = records.append
        res["slo_ttft_s"] = ttft(llm, prompt)
        res["slo_steps"] = len(records) + 1  # the last step has no next schedule() to end it
        llm.engine.scheduler.step_observer = None
        short = prompt[:short_len]
        res["slo_short_alone_ttft_s"] = ttft(llm, short)
        res["slo_with_short"] = short_during_long(llm.engine, prompt, short[::-1], short_at_s)
    finally:
        llm.shutdown()
    res["slo_over_one_pass"] = res["slo_ttft_s"] / res["one_pass_ttft_s"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the built-in default model")
    p.add_argument("--prompt-len", type=int, default=7179)
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cpu-comm", default="auto", choices=["auto", "shm", "gloo"])
    p.add_argument("--short-len", type=int, default=128, help="the short prompt arriving mid-way")
    p.add_argument("--short-at-s", type=float, default=5.0, help="its arrival, s into the long prefill")
    p.add_argument("--json", type=Path, default=Path("results/long_prompt.json"))
    args = p.parse_args()
    from sp_serve.model.source import checkpoint_dir, default_model
    model = args.model or default_model().path
    vocab = json.loads((checkpoint_dir(model) / "config.json").read_text())["vocab_size"]
    prompt = [(17 * i + 5) % (vocab - 10) + 5 for i in range(args.prompt_len)]
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "load_avg_at_start": os.getloadavg()}
    print(f"model {model}; {args.prompt_len}-token prompt; machine {machine}", flush=True)
    runs = []
    for sp in args.sp:
        runs.append(run_sp(model, sp, prompt, args.reps, args.cpu_comm, args.short_len, args.short_at_s))
        print(json.dumps(runs[-1], indent=1), flush=True)
    print(f"\n{'':34}" + "".join(f"{'SP=' + str(r['sp']):>12}" for r in runs))
    rows = [("one-pass TTFT (s)", lambda r: r["one_pass_ttft_s"]),
            ("slo TTFT (s)", lambda r: r["slo_ttft_s"]),
            ("slo / one pass", lambda r: r["slo_over_one_pass"]),
            ("slo steps", lambda r: r["slo_steps"]),
            ("short prompt alone TTFT (s)", lambda r: r["slo_short_alone_ttft_s"]),
            ("short arriving mid-long TTFT (s)", lambda r: r["slo_with_short"]["short_ttft_s"]),
            ("long TTFT with that short (s)", lambda r: r["slo_with_short"]["long_ttft_s"]),
            ("cost model step_fixed (ms)", lambda r: 1e3 * r["cost_model"]["step_fixed_s"]),
            ("cost model chunk_fixed (ms)", lambda r: 1e3 * r["cost_model"]["chunk_fixed_s"])]
    rows += [(f"{name} (ms)", lambda r, n=name: 1e3 * r["steps_s"][n]) for name in runs[0]["steps_s"]]
    for label, get in rows:
        print(f"{label:34}" + "".join(f"{get(r):12.3f}" for r in runs))
    if len(runs) >= 2 and runs[0]["sp"] == 1:
        one, two = runs[0], runs[1]
        print(f"\nSP={two['sp']} speed-up over SP=1, slo TTFT: {one['slo_ttft_s'] / two['slo_ttft_s']:.2f}x; "
              f"one pass: {one['one_pass_ttft_s'] / two['one_pass_ttft_s']:.2f}x")
        for b in (1, 8):
            k = f"decode_b{b}_ctx600"
            print(f"decode batch {b}: SP={two['sp']} / SP=1 = {two['steps_s'][k] / one['steps_s'][k]:.2f}x")
    out = {"model": model, "prompt_len": args.prompt_len, "machine": machine, "runs": runs,
           "load_avg_at_end": os.getloadavg()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
