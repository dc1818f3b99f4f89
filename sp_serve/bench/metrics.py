"""Summary metrics of a serving benchmark, keyed as `vllm bench serve` keys them.

Per completed request: TTFT, every ITL gap, E2EL, and TPOT = (E2EL - TTFT) / (output tokens - 1)
(requests of one output token have no TPOT, and count as TPOT 0 for goodput, as in vLLM).
Summaries are in milliseconds: mean_X_ms, median_X_ms, std_X_ms and pP_X_ms for each requested
percentile P (p99, p99.9, ...). Like vLLM, an empty set summarises to 0.
Beside vLLM's ITL (one gap per text chunk) sp-serve adds TBT, keyed the same way (mean_tbt_ms,
p99_tbt_ms, ...): time between tokens, each chunk's gap shared by the tokens it carries, so a
chunk that carries three tokens (held-back UTF-8 text) gives three gaps of a third.
Goodput (DistServe): completed requests per second that meet every given SLO.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sp_serve.bench.client import RequestResult

METRICS = ("ttft", "tpot", "itl", "tbt", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
TBT_DEFINITION = "time between tokens: a chunk's gap shared by the tokens it carries"


def percentile_key(p: float) -> str:
    """99 -> 'p99', 99.9 -> 'p99.9' (vLLM's spelling)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < p <= 100 for p in values):
        raise ValueError(f"--metric-percentiles {text!r}: write numbers in (0, 100] like 50,90,99")
    return values


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or name not in GOODPUT_METRICS or not number >= 0:
            raise ValueError(
                f"--goodput {pair!r}: write KEY:MILLISECONDS with KEY one of "
                f"{list(GOODPUT_METRICS)} and a value >= 0, e.g. --goodput ttft:500 tpot:50"
            )
        slos[name] = number
    return slos


def summarize(values_s: list[float], percentiles: list[float], name: str) -> dict[str, float]:
    """mean/median/std/percentiles of seconds, reported in milliseconds."""
    values = np.asarray(values_s or [0.0], dtype=float) * 1000
    out = {
        f"mean_{name}_ms": float(np.mean(values)),
        f"median_{name}_ms": float(np.median(values)),
        f"std_{name}_ms": float(np.std(values)),
    }
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(values, p))
    return out


def output_token_count(result: RequestResult, tokenizer: Any | None) -> int:
    """The server's usage count; else the tokenizer's count of the text; else text chunks."""
    if result.output_tokens:
        return result.output_tokens
    if tokenizer is not None:
        return len(tokenizer.encode(result.generated_text, add_special_tokens=False))
    return result.num_text_chunks


def tbt_samples(result: RequestResult) -> list[float]:
    """The request's TBT samples; a result that has ITL gaps but no TBT (made by something other
    than the bench client: the simulator, a result file from before TBT) is one token per gap."""
    return result.tbt if result.tbt or not result.itl else result.itl


def tpot(result: RequestResult, output_tokens: int) -> float | None:
    if output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (output_tokens - 1)


def is_good(result: RequestResult, output_tokens: int, slos_ms: dict[str, float]) -> bool:
    measured = {
        "ttft": result.ttft,
        "tpot": tpot(result, output_tokens) or 0.0,
        "e2el": result.latency,
    }
    return all(measured[name] * 1000 <= slo for name, slo in slos_ms.items())


def _peaks(results: list[RequestResult]) -> tuple[float, int]:
    """(max output tokens in any one-second bucket, max requests in flight at once), as vLLM."""
    done = [r for r in results if r.success]
    if not done:
        return 0.0, 0
    t0 = min(r.start_time for r in done)
    buckets: dict[int, int] = {}
    events: list[tuple[float, int]] = []
    for r in done:
        t = r.start_time + r.ttft
        buckets[int(t - t0)] = buckets.get(int(t - t0), 0) + 1
        for gap in r.itl:
            t += gap
            buckets[int(t - t0)] = buckets.get(int(t - t0), 0) + 1
        events += [(r.start_time, 1), (r.start_time + r.latency, -1)]
    in_flight = peak = 0
    for _, delta in sorted(events):  # a departure sorts before an arrival at the same instant
        in_flight += delta
        peak = max(peak, in_flight)
    return float(max(buckets.values())), peak


def compute_metrics(
    results: list[RequestResult],
    duration_s: float,
    percentiles: list[float],
    goodput_slos_ms: dict[str, float] | None = None,
    tokenizer: Any | None = None,
) -> dict[str, Any]:
    """Everything `vllm bench serve` reports, plus short/long TTFT when requests are marked."""
    output_lens = [output_token_count(r, tokenizer) if r.success else 0 for r in results]
    done = [(r, n) for r, n in zip(results, output_lens) if r.success]
    ttfts = [r.ttft for r, _ in done]
    tpots = [t for r, n in done if (t := tpot(r, n)) is not None]
    itls = [gap for r, _ in done for gap in r.itl]
    tbts = [gap for r, _ in done for gap in tbt_samples(r)]
    e2els = [r.latency for r, _ in done]
    total_input = sum(r.prompt_len for r, _ in done)
    total_output = sum(output_lens)
    max_tokens_per_s, max_in_flight = _peaks(results)

    metrics: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "request_goodput": (
            sum(is_good(r, n, goodput_slos_ms) for r, n in done) / duration_s
            if goodput_slos_ms
            else None
        ),
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "max_output_tokens_per_s": max_tokens_per_s,
        "max_concurrent_requests": max_in_flight,
        "output_lens": output_lens,
    }
    reported = [r.cached_tokens for r, _ in done if r.cached_tokens is not None]
    if reported:  # the server reports prompt_tokens_details.cached_tokens (prefix caching)
        metrics["total_cached_tokens"] = sum(reported)
        metrics["prefix_cache_hit_rate"] = sum(reported) / max(1, total_input)
    for name, values in (
        ("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("tbt", tbts), ("e2el", e2els)
    ):
        metrics.update(summarize(values, percentiles, name))

    if any(r.is_long is not None for r in results):
        # Long-doc runs: short requests' TTFT shows head-of-line blocking behind long prefills.
        for kind, want in (("short", False), ("long", True)):
            marked = [r for r in results if r.is_long is want]
            metrics[f"num_{kind}_requests"] = len(marked)
            metrics[f"completed_{kind}"] = sum(r.success for r in marked)
            metrics.update(
                summarize([r.ttft for r in marked if r.success], percentiles, f"{kind}_ttft")
            )
    return metrics
