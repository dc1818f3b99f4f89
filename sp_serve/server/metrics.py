"""Prometheus metrics under vLLM's names, prefixed `sp_serve:`, labelled by model_name.

Latencies and token counts are observed here in the frontend, per engine request; the engine's
state (running, waiting, KV usage, preemptions) is read from `engine.stats()` at scrape time, so
the engine keeps no Prometheus objects. Each app owns its registry: several apps (tests) coexist.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sp_serve.engine.protocol import ITERATION_TOKENS_BUCKETS, EngineClient

logger = logging.getLogger(__name__)

PREFIX = "sp_serve:"
# vLLM's buckets, extended upwards: a million-token prefill takes minutes, not seconds.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0]
_REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
_N_BUCKETS = [1, 2, 5, 10, 20]  # vLLM's for request_params_n


def buckets_1_2_5(max_value: int) -> list[int]:
    """vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return out
            out.append(value)
        exponent += 1


class EngineStatsCollector(Collector):
    """Reads engine.stats() on every scrape."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._engine.stats()
        except Exception:  # a dead engine must not take /metrics down with it
            logger.exception("engine.stats() failed; engine gauges left out of this scrape")
            return
        label = [self._model_name]
        for name, doc, value in [
            ("num_requests_running", "Requests in the engine's running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV blocks in use over all ranks (1 = full).",
             stats.kv_cache_usage),
            # vLLM's older name, which its Grafana dashboard still queries
            ("gpu_cache_usage_perc", "Deprecated alias of kv_cache_usage_perc.",
             stats.kv_cache_usage),
            ("kv_cache_capacity_tokens", "Tokens the KV pools of all ranks hold together "
             "(blocks x block size x ranks; follows --kv-cache-dtype).", stats.kv_capacity_tokens),
        ]:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric(label, value)
            yield gauge
        preemptions = CounterMetricFamily(PREFIX + "num_preemptions",
                                          "Cumulative preemptions by the scheduler.",
                                          labels=["model_name"])
        preemptions.add_metric(label, stats.num_preemptions)
        yield preemptions
        swapped = GaugeMetricFamily(PREFIX + "num_requests_swapped",
                                    "Requests whose KV is in the host pools (swapped out).",
                                    labels=["model_name"])
        swapped.add_metric(label, stats.num_swapped)
        yield swapped
        for name, doc, value in [
            ("num_swapped_out", "Cumulative sequences preempted by a swap to host memory.",
             stats.num_swapped_out),
            ("num_swapped_in", "Cumulative swapped sequences copied back to the device.",
             stats.num_swapped_in),
            ("swapped_out_blocks", "Cumulative KV blocks copied to host memory (all ranks).",
             stats.swapped_out_blocks),
            ("swapped_in_blocks", "Cumulative KV blocks copied back from host memory.",
             stats.swapped_in_blocks),
        ]:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            counter.add_metric(label, value)
            yield counter
        iteration = HistogramMetricFamily(
            PREFIX + "iteration_tokens_total",
            "Tokens per engine step (prompt chunk tokens + decode tokens).", labels=["model_name"])
        cumulative, total = [], 0
        for bound, count in zip([*ITERATION_TOKENS_BUCKETS, "+Inf"], stats.iteration_tokens_counts):
            total += count
            cumulative.append((str(float(bound)) if bound != "+Inf" else bound, total))
        iteration.add_metric(label, cumulative, float(stats.iteration_tokens_sum))
        yield iteration
        cache_config = getattr(self._engine, "cache_config", None)
        if cache_config:
            info = GaugeMetricFamily(PREFIX + "cache_config_info", "Information of the KV cache "
                                     "configuration (per rank; vLLM's labels).",
                                     labels=sorted(cache_config))
            info.add_metric([cache_config[k] for k in sorted(cache_config)], 1.0)
            yield info
        for name, doc, value in [
            ("prefix_cache_queries", "Prefix cache queries, in prompt tokens looked up.",
             stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prefix cache hits, in prompt tokens found cached.",
             stats.prefix_cache_hits),
        ]:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            counter.add_metric(label, value)
            yield counter


class ServerMetrics:
    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first token, per engine request.",
            _TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive engine steps' outputs.",
            _ITL_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to last token, per engine request.",
            _REQUEST_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled, as the engine reports it.",
            _REQUEST_BUCKETS)
        tokens_buckets = buckets_1_2_5(engine.max_model_len)
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds", "Mean time per output token after the first, per "
            "finished engine request (decode time / (output tokens - 1)).", _ITL_BUCKETS)
        self.request_prefill_time = histogram(
            "request_prefill_time_seconds", "First scheduled to first token, per engine request.",
            _REQUEST_BUCKETS)
        self.request_decode_time = histogram(
            "request_decode_time_seconds", "First token to last token, per engine request.",
            _REQUEST_BUCKETS)
        self.request_inference_time = histogram(
            "request_inference_time_seconds", "First scheduled to last token, per engine request.",
            _REQUEST_BUCKETS)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per finished engine request.", tokens_buckets)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished engine request.",
            tokens_buckets)
        self.request_max_num_generation_tokens = histogram(
            "request_max_num_generation_tokens", "The most tokens any choice of a finished HTTP "
            "request generated.", tokens_buckets)
        self.request_params_n = histogram(
            "request_params_n", "n per HTTP request (choices per prompt).", _N_BUCKETS)
        self.request_params_max_tokens = histogram(
            "request_params_max_tokens", "max_tokens per engine request (as resolved).",
            tokens_buckets)
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._success = Counter(PREFIX + "request_success", "Finished engine requests by reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self.registry.register(EngineStatsCollector(engine, model_name))

    def request_finished(self, finish_reason: str) -> None:
        self._success.labels(self._model_name, finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
