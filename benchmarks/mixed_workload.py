"""A mixed workload at SP=2: a few long documents among many short chat requests, Poisson
arrivals, served with `--scheduler slo` and then `--scheduler fcfs` on the same checkpoint.

    python benchmarks/mixed_workload.py [--json results/mixed_workload.json] [--num-prompts 64]

For each scheduler it starts a real `sp-serve serve` process, runs `sp-serve bench serve`'s
library API (the long-doc dataset, chat endpoint, greedy, ignore_eos) against it, stops it with
SIGTERM, and reports short requests' TTFT p50/p99, every request's TBT per token and ITL per
text chunk p50/p99 (a chunk carrying several tokens spans several engine steps: TBT shares its
gap among them, ITL counts it whole), total token throughput, the server's step log (decode-only
step p50 and its batch, mixed steps, prompt tokens per second beside decodes), and the slo/fcfs
ratios against the targets: TBT p99 (per token) within --tbt-slo-ms (itself at most twice the
decode-only step p50), short TTFT p99 at least 5x lower than fcfs, throughput within 5% of
fcfs, long TTFT p50 at most 1.5x fcfs's. It measures and prints; it asserts nothing. The
default checkpoint is random (make_tiny_model with bigger sizes, 4 layers); --model-dir takes a
real one (e.g. SmolLM2-135M, 30 layers).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from sp_serve.bench.config import ServeBenchConfig
from sp_serve.bench.serve import run_benchmark

SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 40960}


def make_model(root: Path) -> Path:
    """The random checkpoint, answering in ASCII only (one text chunk per token: see
    make_tiny_model's ascii_only); remade when SHAPE changes."""
    from sp_serve.model.tiny import cached_tiny_model

    return cached_tiny_model(root, arch="llama", seed=0, ascii_only=True, **SHAPE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, scheduler: str, args: argparse.Namespace, log: Path,
                 step_log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "sp_serve.cli", "serve", "--model", str(model), "--sp-size", "2",
           "--port", str(port), "--scheduler", scheduler, "--tbt-slo-ms", str(args.tbt_slo_ms),
           "--ttft-slo-ms", str(args.ttft_slo_ms), "--cpu-threads", "1",
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--step-log", str(step_log)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the {scheduler} server did not start:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int | None:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=30)


def warm_up(url: str, model: str) -> None:
    """One short request, so one-off start-up costs land outside the measurement."""
    httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})


def server_itl(url: str, tbt_slo_s: float) -> dict[str, float]:
    """The server's own per-token TBT histogram (`sp_serve:inter_token_latency_seconds`, observed
    in the frontend per engine step): how many gaps and the share within the TBT target."""
    buckets: dict[float, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("sp_serve:inter_token_latency_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[math.inf if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    total = buckets.get(math.inf, 0.0)
    edge = max((b for b in buckets if b <= tbt_slo_s), default=None)
    within = buckets[edge] if edge is not None else 0.0
    return {"server_itl_count": total, "server_itl_bucket_s": edge,
            "server_itl_within_bucket_frac": within / total if total else math.nan}


def step_stats(step_log: Path) -> dict[str, Any]:
    """From the server's step log: the decode-only steps' p50 (what the TBT target is set
    against: at most twice it), their typical batch, and each kind's count and p50."""
    steps = [json.loads(line) for line in step_log.read_text().splitlines() if line.strip()]
    out: dict[str, Any] = {}
    for kind in ("decode", "mixed", "prefill"):
        times = sorted(s["measured_s"] for s in steps if s["kind"] == kind)
        out[f"{kind}_steps"] = len(times)
        out[f"{kind}_step_p50_ms"] = 1e3 * times[len(times) // 2] if times else math.nan
        out[f"{kind}_step_p99_ms"] = 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))] if times else math.nan
    batches = sorted(s["decode"][0] for s in steps if s["kind"] == "decode")
    out["decode_batch_p50"] = batches[len(batches) // 2] if batches else 0
    prefill = sum(n for s in steps for n, _ in s["chunks"])
    beside = sum(n for s in steps if s["kind"] == "mixed" for n, _ in s["chunks"])
    mixed_s = sum(s["measured_s"] for s in steps if s["kind"] == "mixed")
    out["prefill_tokens"] = prefill
    # The long prompts' progress while sequences decode: prompt tokens per second of mixed steps.
    out["prefill_tok_per_s_beside_decodes"] = beside / mixed_s if mixed_s else math.nan
    return out


def run_one(model: Path, scheduler: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    step_log = log_dir / f"steps-{scheduler}.jsonl"
    proc, url = start_server(model, scheduler, args, log_dir / f"server-{scheduler}.log", step_log)
    try:
        warm_up(url, str(model))
        config = ServeBenchConfig(
            base_url=url, endpoint="/v1/chat/completions", dataset_name="long-doc",
            num_prompts=args.num_prompts, long_fraction=args.long_fraction,
            long_input_len=args.long_input_len, short_input_len=args.short_input_len,
            random_output_len=args.output_len, random_range_ratio=args.range_ratio,
            request_rate=args.request_rate, seed=args.seed, ignore_eos=True, temperature=0.0,
            request_timeout_s=1800, percentiles=[50.0, 90.0, 99.0], show_progress=False,
            label=f"mixed-{scheduler}")
        started = time.monotonic()
        result = asyncio.run(run_benchmark(config))
        result["wall_s"] = time.monotonic() - started
        result.update(server_itl(url, args.tbt_slo_ms / 1e3))
    finally:
        result_code = stop_server(proc)
    result["server_exit_code"] = result_code
    result.update(step_stats(step_log))
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ["completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
            "total_token_throughput", "output_throughput", "request_throughput",
            "median_short_ttft_ms", "p99_short_ttft_ms", "median_long_ttft_ms", "p99_long_ttft_ms",
            "median_itl_ms", "p99_itl_ms", "median_tbt_ms", "p99_tbt_ms", "median_ttft_ms",
            "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "num_short_requests",
            "num_long_requests", "server_itl_count", "server_itl_bucket_s",
            "server_itl_within_bucket_frac", "wall_s", "decode_steps",
            "decode_step_p50_ms", "decode_batch_p50", "mixed_steps", "mixed_step_p50_ms",
            "mixed_step_p99_ms", "prefill_steps", "prefill_step_p50_ms",
            "prefill_tok_per_s_beside_decodes"]
    return {k: result.get(k) for k in keys}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    slo, fcfs = runs["slo"], runs["fcfs"]
    ratios = {
        "short_ttft_p99_fcfs_over_slo": ratio(fcfs["p99_short_ttft_ms"], slo["p99_short_ttft_ms"]),
        "short_ttft_p50_fcfs_over_slo": ratio(fcfs["median_short_ttft_ms"], slo["median_short_ttft_ms"]),
        "itl_p99_fcfs_over_slo": ratio(fcfs["p99_itl_ms"], slo["p99_itl_ms"]),
        "throughput_slo_over_fcfs": ratio(slo["total_token_throughput"], fcfs["total_token_throughput"]),
        "long_ttft_p50_slo_over_fcfs": ratio(slo["median_long_ttft_ms"], fcfs["median_long_ttft_ms"]),
    }
    targets = {
        "slo_tbt_p99_within_tbt_slo": slo["p99_tbt_ms"] <= args.tbt_slo_ms,  # per token
        "tbt_slo_at_most_2x_decode_step_p50": args.tbt_slo_ms <= 2 * slo["decode_step_p50_ms"],
        "short_ttft_p99_5x_lower_than_fcfs": ratios["short_ttft_p99_fcfs_over_slo"] >= 5,
        "throughput_loss_at_most_5pct": ratios["throughput_slo_over_fcfs"] >= 0.95,
        "long_ttft_p50_at_most_1.5x_fcfs": ratios["long_ttft_p50_slo_over_fcfs"] <= 1.5,
    }
    rows = [("short TTFT p50 (ms)", "median_short_ttft_ms"), ("short TTFT p99 (ms)", "p99_short_ttft_ms"),
            ("long TTFT p50 (ms)", "median_long_ttft_ms"),
            ("ITL per chunk p50 (ms)", "median_itl_ms"), ("ITL per chunk p99 (ms)", "p99_itl_ms"),
            ("TBT per token p50 / p99 ms", None),
            ("server TBT share <= SLO", "server_itl_within_bucket_frac"),
            ("total throughput (tok/s)", "total_token_throughput"),
            ("output throughput (tok/s)", "output_throughput"), ("duration (s)", "duration"),
            ("decode-only step p50 (ms)", "decode_step_p50_ms"), ("at decode batch p50", "decode_batch_p50"),
            ("mixed step p50 / p99 (ms)", None), ("prompt tok/s beside decodes", "prefill_tok_per_s_beside_decodes"),
            ("completed / failed", None)]
    print(f"\n{'':28}{'slo':>16}{'fcfs':>16}")
    for label, key in rows:
        if key is None and label.startswith("mixed"):
            cells = [f"{r['mixed_step_p50_ms']:.0f} / {r['mixed_step_p99_ms']:.0f}" for r in (slo, fcfs)]
        elif key is None and label.startswith("TBT"):
            cells = [f"{r['median_tbt_ms']:.1f} / {r['p99_tbt_ms']:.1f}" for r in (slo, fcfs)]
        elif key is None:
            cells = [f"{r['completed']} / {r['failed']}" for r in (slo, fcfs)]
        else:
            cells = [f"{r[key]:.3f}" if r[key] < 1 else f"{r[key]:.1f}" for r in (slo, fcfs)]
        print(f"{label:28}{cells[0]:>16}{cells[1]:>16}")
    print()
    for name, value in ratios.items():
        print(f"{name:34}{value:10.2f}")
    for name, ok in targets.items():
        print(f"{name:34}{'met' if ok else 'MISSED':>10}")
    return {"ratios": ratios, "targets": targets}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=None, help="default: a cached random checkpoint")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--long-fraction", type=float, default=4 / 64)
    p.add_argument("--long-input-len", type=int, default=16384, help="mean; x [0.5, 1.5] by --range-ratio")
    p.add_argument("--short-input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--request-rate", type=float, default=0.5, help="Poisson arrivals, req/s")
    p.add_argument("--tbt-slo-ms", type=float, default=200.0)
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--schedulers", nargs="+", default=["slo", "fcfs"], choices=["slo", "fcfs"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("results/mixed_workload.json"))
    args = p.parse_args()

    cache = Path(os.environ.get("SP_SERVE_CACHE", "~/.cache/sp-serve")).expanduser()
    model = args.model_dir or make_model(cache / "bench-mixed-workload")
    log_dir = Path(tempfile.mkdtemp(prefix="sp-serve-mixed-"))
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "load_avg_at_start": os.getloadavg(), "note": "shared machine: other work may run"}
    print(f"model {model} {SHAPE}; server logs in {log_dir}; machine {machine}")
    runs, full = {}, {}
    for scheduler in args.schedulers:
        print(f"\n=== --scheduler {scheduler} ===", flush=True)
        full[scheduler] = run_one(model, scheduler, args, log_dir)
        runs[scheduler] = summary(full[scheduler])
        print(json.dumps(runs[scheduler], indent=1), flush=True)
    out = {"workload": vars(args) | {"model_dir": str(model), "json": str(args.json)},
           "model_shape": SHAPE, "machine": machine, "summary": runs}
    if {"slo", "fcfs"} <= set(runs):
        out |= report(runs, args)
    out["load_avg_at_end"] = os.getloadavg()
    out["per_request"] = {s: {k: r.get(k) for k in ("input_lens", "output_lens", "ttfts", "itls",
                                                      "tbts", "is_long", "start_times", "errors")}
                          for s, r in full.items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nsaved {args.json}")


if __name__ == "__main__":
    main()
