"""How well does `sp-serve plan --simulate` predict this machine? Measures, never asserts.

    python benchmarks/validate_simulator.py                       # SP=2, a small long-doc load
    python benchmarks/validate_simulator.py --sp-size 2 --num-prompts 24 --request-rate 2 \\
        --long-input-len 2048 --short-input-len 128 --output-len 32 --json out.json

1. Calibrate: start a real engine (LLMEngine, --sp-size ranks) on the model; its start-up
   profile fits the CostModel, saved to OUT/cost.json.
2. Step times: with that engine, replay the workload in real time in-process (the engine's own
   step loop, no HTTP) and compare every step's measured time with the cost model's prediction
   for the step the scheduler chose; also the per-step time outside the ranks' work (sampling,
   bookkeeping) that the cost model leaves out. TTFT/TBT of this replay vs its simulation.
3. Serving, --serve-runs times (default 3): `sp-serve serve --cost-model OUT/cost.json
   --step-log FILE` and `bench serve`'s client, run i with the workload of seed --seed + i (the
   simulator generates exactly the bench's lengths and arrival times). Each run is predicted
   from the other runs (leave one out): step costs and noise fitted on their step logs (every
   step as the server measured it under HTTP load) and their per-request serving latency
   (median TTFT beyond the simulated). Printed: each run's logged step times against that fit,
   and its TTFT/TBT/TPOT/E2E measured over HTTP vs simulated on the trace the bench actually
   sent, with each measured figure's bootstrap spread over its requests; then in-sample (all
   runs' logs), also at each run's own measured speed.
Two predictions: "start-up" (the start-up calibration alone, what `plan --simulate
--cost-model cost.json` gives) and "calibrated": for the replay, step times refitted on the
replay plus its noise (in-sample); for HTTP, what `plan --simulate --cost-model cost.json
--step-log LOG [LOG ...] --request-overhead-ms X` gives. Each simulated figure is the mean
over --sim-seeds noise seeds.
Relative error = predicted / measured - 1. The target is within 20%; the machine is shared and
has 2 cores that the ranks, the server and the client all use, so expect noise between runs.
The default model is a small random Llama (4 layers, hidden 256) so steps do real work.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sp_serve.bench.config import ServeBenchConfig
from sp_serve.bench.serve import run_benchmark
from sp_serve.bench.sweep import Server, log_tail
from sp_serve.config import EngineConfig
from sp_serve.engine.cost_model import CostModel
from sp_serve.engine.engine import LLMEngine
from sp_serve.engine.sampling import SamplingParams
from sp_serve.planner.simulator import (
    CalibratedStepCost,
    SimConfig,
    StepLogFit,
    TraceRequest,
    fit_step_log,
    fit_steps,
    generate_trace,
    read_step_log,
    simulate,
    step_seconds,
    trace_from_bench_result,
)

BENCH_MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 2,
               "max_position_embeddings": 16384}
COMPARED = [("ttft", "TTFT"), ("itl", "TBT (ITL)"), ("tpot", "TPOT"), ("e2el", "E2E")]


def bench_model(out: Path) -> str:
    """A small random Llama that answers in ASCII only, so every token is one text chunk over
    HTTP and the client's ITL is per token (see make_tiny_model's ascii_only)."""
    from sp_serve.model.tiny import cached_tiny_model

    return str(cached_tiny_model(out / "bench-model", seed=0, ascii_only=True, **BENCH_MODEL))


def request_overhead(result: dict[str, Any], simulated_ttfts: list[float]) -> float:
    """The serving path's per-request latency under load (HTTP, the hand-off to the engine
    loop, the first SSE event back, on cores the ranks and the client share): the median of
    measured minus simulated TTFT (seconds) over a calibration run's completed requests (those
    trace_from_bench_result replays), simulated without it."""
    rows = zip(result["start_times"], result["ttfts"], result["input_lens"],
               result["output_lens"], result["errors"])
    # in the replayed trace's order: by send time, as trace_from_bench_result sorts them
    measured = [t for _, t, n, m, err in sorted(rows, key=lambda r: r[0]) if not err and n and m]
    assert len(measured) == len(simulated_ttfts)
    return max(0.0, statistics.median(m - s for m, s in zip(measured, simulated_ttfts)))


def serve_and_bench(model: str, args: argparse.Namespace, cost_path: Path, seed: int,
                    log_path: Path, step_log: Path | None = None) -> dict[str, Any]:
    """Starts `sp-serve serve` with the saved cost model, runs the bench client with the
    workload of `seed`, stops the server; the bench result."""
    extra = [] if step_log is None else ["--step-log", str(step_log)]
    server = Server(["--model", model, "--sp-size", str(args.sp_size), "--kv-cache-memory",
                     args.kv_cache_memory, "--cost-model", str(cost_path), *extra], log_path)
    bench = ServeBenchConfig(
        dataset_name=args.dataset_name, num_prompts=args.num_prompts,
        random_input_len=args.input_len, random_output_len=args.output_len,
        long_fraction=args.long_fraction, long_input_len=args.long_input_len,
        short_input_len=args.short_input_len, request_rate=args.request_rate, seed=seed,
        ignore_eos=True, prompt_format="token-ids", num_warmups=1, show_progress=False)
    try:
        server.start(600)
        result = asyncio.run(run_benchmark(dataclasses.replace(bench, base_url=server.base_url)))
    except Exception:
        print(log_tail(server.log_path), file=sys.stderr)
        raise
    finally:
        server.stop(30)
    return result


# --- 2. the in-process replay ---------------------------------------------------------------------


def replay(engine: LLMEngine, trace: list[TraceRequest]) -> dict[str, Any]:
    """Feeds the trace to the engine at its arrival times, one engine.step() at a time, as the
    async engine does; records each step's prediction and measurements and each token's time."""
    cost = CalibratedStepCost(engine.scheduler.cost)
    scheduler = engine.scheduler
    schedule = scheduler.schedule
    planned: list[dict[str, Any] | None] = []

    def schedule_and_predict():
        step = schedule()
        kind = ("mixed" if step.prefill and step.decode else
                "prefill" if step.prefill else "decode")
        if step.is_empty:
            planned.append(None)
        else:
            planned.append({
                "kind": kind, "predicted_s": step_seconds(cost, step),
                "chunks": [(end - start, start) for _, start, end in step.prefill],
                "decode": (len(step.decode), sum(seq.num_cached for seq, _ in step.decode))})
        return step

    scheduler.schedule = schedule_and_predict  # an instance attribute: this engine only
    vocab = engine.spec.vocab_size
    steps, tokens = [], {str(i): [] for i in range(len(trace))}
    t0 = time.monotonic()
    nxt = 0
    try:
        while nxt < len(trace) or engine.has_unfinished():
            now = time.monotonic() - t0
            while nxt < len(trace) and trace[nxt].arrival_time <= now:
                r = trace[nxt]
                ids = [(7 * i + nxt) % (vocab - 10) + 5 for i in range(r.prompt_len)]
                params = SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0)
                engine.add_request(str(nxt), ids, params, arrival_time=t0 + r.arrival_time)
                nxt += 1
            if not engine.has_unfinished():
                time.sleep(max(0.0, trace[nxt].arrival_time - (time.monotonic() - t0)))
                continue
            w0 = time.perf_counter()
            events = engine.step()
            wall = time.perf_counter() - w0
            stamp = time.monotonic() - t0
            for ev in events:
                tokens[ev.seq.request_id].append(stamp)
            if planned[-1] is not None:
                steps.append({**planned[-1], "run_s": engine.last_step.seconds, "wall_s": wall})
    finally:
        del scheduler.schedule
    return {"steps": steps, "token_times": [tokens[str(i)] for i in range(len(trace))]}


def replay_as_bench_result(trace: list[TraceRequest], token_times: list[list[float]]
                           ) -> dict[str, Any]:
    from sp_serve.bench.client import RequestResult
    from sp_serve.bench.metrics import compute_metrics

    results = [RequestResult(success=True, prompt_len=r.prompt_len, output_tokens=len(t),
                             num_text_chunks=len(t), ttft=t[0] - r.arrival_time,
                             itl=np.diff(t).tolist(), latency=t[-1] - r.arrival_time,
                             start_time=r.arrival_time, is_long=r.is_long)
               for r, t in zip(trace, token_times)]
    duration = max(t[-1] for t in token_times)
    return compute_metrics(results, duration, [50.0, 90.0, 99.0])


def refit(steps: list[dict[str, Any]]) -> StepLogFit | None:
    """A CostModel fitted on the replay's measured steps and the noise around it, as
    `plan --simulate --step-log` fits a server's (None: too few steps of a kind)."""
    try:
        return fit_steps([[(s["chunks"], *s["decode"], s["run_s"]) for s in steps]], "the replay")
    except ValueError:
        return None


def step_report(steps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("prefill", "decode", "mixed", "all"):
        chosen = [s for s in steps if kind in ("all", s["kind"])]
        if not chosen:
            continue
        errors = [s["predicted_s"] / s["run_s"] - 1 for s in chosen]
        out[kind] = {
            "count": len(chosen),
            "measured_mean_ms": 1e3 * statistics.fmean(s["run_s"] for s in chosen),
            "predicted_mean_ms": 1e3 * statistics.fmean(s["predicted_s"] for s in chosen),
            "total_rel_error": sum(s["predicted_s"] for s in chosen)
            / sum(s["run_s"] for s in chosen) - 1,
            "median_rel_error": statistics.median(errors),
            "median_abs_rel_error": statistics.median(abs(e) for e in errors),
            "overhead_median_ms": 1e3 * statistics.median(s["wall_s"] - s["run_s"] for s in chosen),
        }
    return out


def predict(trace: list[TraceRequest], config: SimConfig, cost: CalibratedStepCost,
            seeds: int) -> dict[str, Any]:
    """The simulated metrics, each the mean over `seeds` noise seeds (one run without noise):
    the prediction is the expected figure, not one draw of the simulator's noise."""
    if not config.step_time_sigma:
        seeds = 1
    runs = [simulate(trace, dataclasses.replace(config, seed=seed), cost).summary()["metrics"]
            for seed in range(seeds)]
    return {k: statistics.fmean(r[k] for r in runs) for k, v in runs[0].items()
            if isinstance(v, (int, float)) and all(r.get(k) is not None for r in runs)}


def calibrate_on(runs: list[dict[str, Any]], cost, config: SimConfig) -> dict[str, Any]:
    """What `plan --simulate --cost-model cost.json --step-log LOG [LOG ...]
    --request-overhead-ms X` simulates with, from these serving runs: step costs and noise
    fitted on their step logs; X the mean of each run's median TTFT beyond the simulated."""
    fit = fit_step_log([r["step_log"] for r in runs])
    step_cost = fit.step_cost("fitted on serving runs' step logs", scheduler_model=cost)
    noisy = dataclasses.replace(config, step_time_sigma=fit.sigma,
                                step_time_sigma_at_s=fit.sigma_at_s)
    bare = dataclasses.replace(noisy, step_time_sigma=0.0)
    latency = statistics.fmean(
        request_overhead(r["result"], [q.ttft for q in simulate(r["sent"], bare, step_cost).requests])
        for r in runs)
    names = ", ".join(f"seed {r['seed']}" for r in runs)
    return {"cost": step_cost, "fit": fit,
            "config": dataclasses.replace(noisy, request_overhead_s=latency),
            "summary": (f"{names}: {fit.num_steps} steps, speed vs the fit "
                        + "/".join(f"{x:.2f}" for x in fit.run_speed)
                        + f", noise {noise(fit.sigma, fit.sigma_at_s)}, "
                        f"request latency {1e3 * latency:.1f} ms")}


# --- comparison -----------------------------------------------------------------------------------


def compare(measured: dict[str, Any], predicted: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, name in COMPARED:
        for stat in ("mean", "median", "p90"):
            m, p = measured[f"{stat}_{key}_ms"], predicted[f"{stat}_{key}_ms"]
            rows.append({"metric": f"{name} {stat}", "key": f"{stat}_{key}_ms", "measured_ms": m,
                         "predicted_ms": p, "rel_error": p / m - 1 if m else None})
    for kind in ("short", "long"):
        k = f"median_{kind}_ttft_ms"
        if k in measured and k in predicted and measured[k]:
            rows.append({"metric": f"TTFT {kind} median", "key": k, "measured_ms": measured[k],
                         "predicted_ms": predicted[k], "rel_error": predicted[k] / measured[k] - 1})
    return rows


def print_comparison(title: str, columns: dict[str, list[dict[str, Any]]]) -> None:
    names = list(columns)
    first = columns[names[0]]
    print(f"\n{title}")
    header = f"  {'metric':<22}{'measured':>12}" + "".join(
        f"{n:>14}{'err':>8}" for n in names)
    print(header)
    for i, row in enumerate(first):
        line = f"  {row['metric']:<22}{row['measured_ms']:>10.1f}ms"
        for n in names:
            r = columns[n][i]
            line += f"{r['predicted_ms']:>12.1f}ms{_pct(r['rel_error']):>8}"
        print(line)


def logged_step_errors(step_log: Path, cost: CalibratedStepCost) -> dict[str, Any]:
    """A step cost's predictions for the steps a server logged: per kind (steps with prefill
    chunks, decode steps), the total relative error and the median per-step |error|."""
    out = {}
    steps = read_step_log(step_log)
    for kind in ("prefill", "decode"):
        pairs = [(cost.logged_step_s(s), s[3]) for s in steps
                 if bool(s[0]) == (kind == "prefill") and s[3] > 0]
        if pairs:
            out[kind] = {"count": len(pairs),
                         "total_rel_error": sum(p for p, _ in pairs) / sum(m for _, m in pairs) - 1,
                         "median_abs_rel_error": statistics.median(abs(p / m - 1) for p, m in pairs)}
    return out


def measured_spread(result: dict[str, Any], resamples: int = 300, seed: int = 0
                    ) -> dict[str, float]:
    """How well a run's own figures are pinned down by its requests: for each compared metric,
    half the 5-95% range over bootstrap resamples of the requests, relative to the figure. A
    median or p90 over 24 requests of a two-humped distribution (a request either waited for
    a prefill step or not) moves a lot with which requests were drawn."""
    from sp_serve.bench.client import RequestResult
    from sp_serve.bench.metrics import compute_metrics

    requests = [RequestResult(success=not err and bool(n), prompt_len=p, output_tokens=n,
                              num_text_chunks=len(itl) + 1, ttft=t, itl=itl, latency=lat,
                              start_time=st, is_long=long_, error=err)
                for p, n, t, itl, lat, st, err, long_ in zip(
                    result["input_lens"], result["output_lens"], result["ttfts"], result["itls"],
                    result["latencies"], result["start_times"], result["errors"],
                    result.get("is_long") or [None] * len(result["ttfts"]))]
    rng = np.random.default_rng(seed)
    draws = [compute_metrics([requests[i] for i in rng.integers(0, len(requests), len(requests))],
                             result["duration"], [50.0, 90.0, 99.0]) for _ in range(resamples)]
    spread = {}
    for row in compare(result, result):
        key = row["key"]
        values = [d[key] for d in draws if d.get(key) is not None]
        if values and result[key]:
            lo, hi = np.percentile(values, [5, 95])
            spread[row["metric"]] = float((hi - lo) / 2 / result[key])
    return spread


def print_runs(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """One line per metric: each run's measured figure and the predictions' errors."""
    print(f"\n{title}")
    width = 18 + 14 * len(columns)
    print(f"  {'':<22}" + "".join(f"{'run ' + str(r['run']) + ' (seed ' + str(r['seed']) + ')':>{width}}"
                                 for r in rows))
    print(f"  {'metric':<22}" + (f"{'measured (±)':>18}" + "".join(f"{c:>14}" for c in columns))
          * len(rows))
    for i, first in enumerate(rows[0][columns[0]]):
        line = f"  {first['metric']:<22}"
        for r in rows:
            spread = r.get("spread", {}).get(first["metric"])
            line += f"{r[columns[0]][i]['measured_ms']:>10.1f}ms"
            line += f"{'' if spread is None else f'±{100 * spread:.0f}%':>6}"
            line += "".join(f"{_pct(r[c][i]['rel_error']):>14}" for c in columns)
        print(line)


def noise(sigma: float, at_s: float) -> str:
    return (f"sigma {sigma:.2f} at {1e3 * at_s:.0f} ms" if at_s
            else f"sigma {sigma:.2f} at every step length")


def _pct(error: float | None) -> str:
    return "" if error is None else f"{100 * error:+.0f}%"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: a small random Llama)")
    p.add_argument("--sp-size", type=int, default=2)
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--dataset-name", default="long-doc", choices=["random", "long-doc"])
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--request-rate", type=float, default=2.0)
    p.add_argument("--input-len", type=int, default=512, help="random dataset prompt length")
    p.add_argument("--long-input-len", type=int, default=2048)
    p.add_argument("--short-input-len", type=int, default=128)
    p.add_argument("--long-fraction", type=float, default=0.25)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the calibration replay's workload")
    p.add_argument("--serve-runs", type=int, default=3,
                   help="HTTP runs, of workloads --seed, --seed + 1, ...; each is predicted from "
                   "the others' step logs (at least 2)")
    p.add_argument("--sim-seeds", type=int, default=8,
                   help="noise seeds each simulated figure is the mean over")
    p.add_argument("--out-dir", default="validate-simulator-out")
    p.add_argument("--json", default=None, help="also write every figure here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or bench_model(out)
    trace = generate_trace(args.dataset_name, args.num_prompts, args.request_rate, 1.0, args.seed,
                           args.input_len, args.output_len, 0.0, args.long_fraction,
                           args.long_input_len, args.short_input_len)
    cost_path = out / "cost.json"
    if args.serve_runs < 2:
        p.error("--serve-runs must be at least 2 (each run is predicted from the others)")

    # 1 + 2: calibrate, then replay in-process with that engine.
    t0 = time.monotonic()
    engine = LLMEngine(EngineConfig(model=model, sp_size=args.sp_size, scheduler="slo",
                                    kv_cache_memory=_bytes(args.kv_cache_memory)))
    try:
        cost = engine.scheduler.cost
        cost.save(str(cost_path))
        kv_blocks, block_size = engine.runtime.num_blocks, engine.config.block_size
        econf = engine.config
        print(f"calibrated in {time.monotonic() - t0:.1f} s (engine start included): {cost}")
        t1 = time.monotonic()
        replayed = replay(engine, trace)
        print(f"in-process replay: {len(trace)} requests in {time.monotonic() - t1:.1f} s")
    finally:
        engine.shutdown()
    (out / "replay-steps.json").write_text(json.dumps(replayed["steps"]))
    steps = step_report(replayed["steps"])
    config = SimConfig(sp_size=args.sp_size, scheduler="slo", ttft_slo_s=econf.ttft_slo_ms / 1e3,
                       tbt_slo_s=econf.tbt_slo_ms / 1e3, max_num_seqs=econf.max_num_seqs,
                       max_num_batched_tokens=econf.max_num_batched_tokens, block_size=block_size,
                       num_kv_blocks=kv_blocks)
    overhead_s = steps["all"]["overhead_median_ms"] / 1e3
    measured_replay = replay_as_bench_result(trace, replayed["token_times"])
    replay_fit = refit(replayed["steps"])
    refitted = None if replay_fit is None else replay_fit.model
    # Step-time models: the start-up calibration (what the server schedules with), and the
    # model refitted on the replay's measured steps (the scheduler still decides with the
    # start-up one, as the server did), plus the measured per-step work outside the ranks.
    # The calibrated column also carries the replay's step-to-step noise around that model.
    sigma = 0.0 if replay_fit is None else replay_fit.sigma
    sigma_at_s = 0.0 if replay_fit is None else replay_fit.sigma_at_s
    models = {"start-up": (CalibratedStepCost(cost), config)}
    if refitted is not None:
        models["calibrated"] = (
            replay_fit.step_cost("refit on the replay", scheduler_model=cost),
            dataclasses.replace(config, step_overhead_s=overhead_s, step_time_sigma=sigma,
                                step_time_sigma_at_s=sigma_at_s, seed=args.seed))
    sim_replay = {name: predict(trace, c, m, args.sim_seeds) for name, (m, c) in models.items()}

    # 3: serving, --serve-runs runs of different workloads (seeds), each logging every step as
    # the server measured it under HTTP load. Each run is predicted from the others (leave one
    # out): the step times and their noise fitted on their step logs, and their per-request
    # serving latency; and, in-sample, from all of them.
    runs = []
    for i in range(args.serve_runs):
        seed = args.seed + i
        step_log = out / f"steps-{i}.jsonl"
        step_log.unlink(missing_ok=True)
        result = serve_and_bench(model, args, cost_path, seed, out / f"server-{i}.log", step_log)
        (out / f"bench-result-{i}.json").write_text(json.dumps(result))
        runs.append({"seed": seed, "result": result, "sent": trace_from_bench_result(result),
                     "step_log": step_log})
    startup = (CalibratedStepCost(cost), config)
    loo, insample = [], []
    everything = calibrate_on(runs, cost, config)
    for i, run in enumerate(runs):
        others = [r for j, r in enumerate(runs) if j != i]
        spread = measured_spread(run["result"])
        for calibration, table in ((calibrate_on(others, cost, config), loo),
                                   (everything, insample)):
            m, c = calibration["cost"], calibration["config"]
            table.append({
                "run": i, "seed": run["seed"], "calibration": calibration["summary"],
                "spread": spread, "step_times": logged_step_errors(run["step_log"], m),
                "start-up": compare(run["result"],
                                    predict(run["sent"], startup[1], startup[0], args.sim_seeds)),
                "calibrated": compare(run["result"], predict(run["sent"], c, m, args.sim_seeds))})
        # How much of the error is this run's own speed (measured / the pooled fit over its
        # steps; a shared machine drifts between runs): the in-sample model at that speed.
        speed = everything["fit"].run_speed[i]
        m = everything["cost"]
        at_speed = CalibratedStepCost(
            CostModel(**{k: speed * v for k, v in m.model.__dict__.items()}),
            f"x{speed:.3f}", m.scheduler_model, m.decode_batch_factor)
        insample[-1]["speed"] = speed
        insample[-1]["at own speed"] = compare(
            run["result"], predict(run["sent"], everything["config"], at_speed, args.sim_seeds))
    serve_trace = generate_trace(args.dataset_name, args.num_prompts, args.request_rate, 1.0,
                                 args.seed + len(runs) - 1, args.input_len, args.output_len, 0.0,
                                 args.long_fraction, args.long_input_len, args.short_input_len)
    same = [(r.prompt_len, r.output_len) for r in runs[-1]["sent"]] == [
        (r.prompt_len, r.output_len) for r in serve_trace]

    # Report.
    print(f"\nmachine: 2 shared CPU cores; SP={args.sp_size}; model {model}; workload "
          f"{args.dataset_name}, {args.num_prompts} requests at {args.request_rate:g} req/s, "
          f"output {args.output_len} tokens; replay seed {args.seed}, HTTP runs seeds "
          f"{args.seed}..{args.seed + args.serve_runs - 1}; bench sent the simulated workload: "
          f"{same}")
    print("\nstep times, in-process replay: predicted (cost model) vs measured (ranks' work)")
    print(f"  {'kind':<9}{'steps':>6}{'measured':>11}{'predicted':>11}{'total err':>11}"
          f"{'median err':>12}{'median |err|':>14}{'other work':>12}")
    for kind, st in steps.items():
        print(f"  {kind:<9}{st['count']:>6}{st['measured_mean_ms']:>9.1f}ms"
              f"{st['predicted_mean_ms']:>9.1f}ms{100 * st['total_rel_error']:>+10.0f}%"
              f"{100 * st['median_rel_error']:>+11.0f}%{100 * st['median_abs_rel_error']:>13.0f}%"
              f"{st['overhead_median_ms']:>10.1f}ms")
    if refitted is not None:
        print(f"  refit on these steps: {refitted}")
    replay_rows = {name: compare(measured_replay, m) for name, m in sim_replay.items()}
    print_comparison("in-process replay (engine.step loop, no HTTP): measured vs simulated",
                     replay_rows)
    print("\nstep times, each HTTP run's logged steps predicted from the other runs' step logs "
          "(out of sample)")
    print(f"  {'run':<16}{'prefill steps':>14}{'total err':>11}{'median |err|':>14}"
          f"{'decode steps':>14}{'total err':>11}{'median |err|':>14}")
    for row in loo:
        line = f"  {'run ' + str(row['run']) + ' (seed ' + str(row['seed']) + ')':<16}"
        for kind in ("prefill", "decode"):
            st = row["step_times"].get(kind)
            line += ("" if st is None else f"{st['count']:>14}{_pct(st['total_rel_error']):>11}"
                     f"{100 * st['median_abs_rel_error']:>13.0f}%")
        print(line)
    print_runs("HTTP serving, each run predicted from the other runs' step logs (out of sample; "
               "±: half the measured figure's 5-95% bootstrap range over its requests)",
               loo, ["calibrated", "start-up"])
    print_runs("HTTP serving, each run from all runs' step logs (in-sample; 'at own speed': "
               "its steps' mean measured / model of " + ", ".join(
                   f"{r['speed']:.3f}" for r in insample) + ")", insample,
               ["calibrated", "at own speed"])
    result = runs[-1]["result"]
    chunks = sum(len(itl) + 1 for itl, n in zip(result["itls"], result["output_lens"]) if n)
    per_chunk = sum(result["output_lens"]) / max(1, chunks)
    if per_chunk > 1.01:
        print(f"\nOver HTTP the client sees {per_chunk:.2f} tokens per text chunk (the detokenizer "
              "holds back incomplete UTF-8, common\nfor a random byte-level model), so HTTP ITL "
              "is per chunk, not per token: compare TPOT there.")
    print("\nstart-up: step times from the engine's start-up calibration (cost.json, which the "
          "server schedules with), nothing else.\ncalibrated, replay: step times from a CostModel "
          "refitted on the replay's measured steps (the scheduler still decides with\nthe "
          f"start-up one), the median per-step work outside the ranks ({1e3 * overhead_s:.1f} ms), "
          f"log-normal step noise {noise(sigma, sigma_at_s)} (the replay's\n"
          "residuals); in-sample. calibrated, HTTP: what `plan --simulate --cost-model cost.json "
          "--step-log LOG [LOG ...] --request-overhead-ms X`\ngives with the other runs' step "
          "logs and per-request latency (the median TTFT beyond the simulated). Simulated\nfigures are "
          f"means over {args.sim_seeds} noise seeds.")
    for row in loo:
        print(f"  run {row['run']} (seed {row['seed']}) predicted from {row['calibration']}")
    figures = {
        "sp_size": args.sp_size, "model": model, "cost_model": cost.__dict__,
        "refit_cost_model": None if refitted is None else refitted.__dict__,
        "kv_blocks_per_rank": kv_blocks, "workload": vars(args), "bench_sent_same_workload": same,
        "step_times": steps, "replay": replay_rows, "serving_leave_one_out": loo, "serving_in_sample": insample,
        "step_overhead_ms": 1e3 * overhead_s, "http_tokens_per_text_chunk": per_chunk,
        "replay_step_time_sigma": sigma, "replay_step_time_sigma_at_s": sigma_at_s,
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def _bytes(text: str) -> int:
    from sp_serve.config import parse_bytes

    return parse_bytes(text)


if __name__ == "__main__":
    sys.exit(main())
