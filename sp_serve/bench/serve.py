"""`sp-serve bench serve`: a load generator for any OpenAI-compatible server.

Speaks `vllm bench serve`'s flags and writes a superset of its result JSON, so one command
measures sp-serve, vLLM and SGLang side by side:

    sp-serve bench serve --base-url http://127.0.0.1:8000 --dataset-name long-doc \\
        --num-prompts 200 --request-rate 2 --long-fraction 0.1 --long-input-len 65536 \\
        --goodput ttft:2000 tpot:100 --save-result --result-dir results/

Requests are sent at seeded Poisson (or gamma) arrival times, at most --max-concurrency at once,
each bounded by --request-timeout so a run always ends. Failed requests are counted and their
errors (HTTP status and body) listed, never dropped.
"""
# This file runs the benchmark; the flags are in serve_cli.py, the table and file in report.py.

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sp_serve.bench.arrivals import arrival_times
from sp_serve.bench.client import RequestResult, send_request
from sp_serve.bench.config import ENDPOINTS, SP_SERVE_TAGS, ServeBenchConfig
from sp_serve.bench.datasets import (
    SampleRequest,
    jsonl_requests,
    prefix_repetition_requests,
    load_tokenizer,
    long_doc_requests,
    random_requests,
)
from sp_serve.bench.metrics import TBT_DEFINITION, compute_metrics
from sp_serve.bench.report import ProgressBar

# --- server, dataset and request plumbing ---------------------------------------------------------


async def fetch_model_card(
    client: httpx.AsyncClient, base_url: str, model: str | None, headers: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    """(model id, its /v1/models card). The card is {} when the server has no such route."""
    url = f"{base_url}/v1/models"
    try:
        response = await client.get(url, headers=headers, timeout=30)
        response.raise_for_status()
        body = response.json()
        cards = body.get("data") if isinstance(body, dict) else None
        if not cards:
            raise ValueError("the model list is empty")
    except (httpx.HTTPError, ValueError) as exc:
        if model is not None:
            return model, {}
        raise ValueError(
            f"cannot list the models at {url} ({exc}); is the server up? "
            "pass --model to skip the lookup"
        ) from None
    card = next((c for c in cards if c.get("id") == model), cards[0])
    if "sp_serve" not in card and isinstance(body.get("sp_serve"), dict):
        card = {**card, "sp_serve": body["sp_serve"]}
    return model or card["id"], card


def default_tokenizer(model: str, card: dict[str, Any]) -> str | None:
    """The model's directory when the model id (or the card's root) is a local path."""
    for candidate in (model, card.get("root")):
        if candidate and Path(candidate).is_dir():
            return candidate
    return None


def build_requests(
    config: ServeBenchConfig, tokenizer: Any | None, rng: np.random.Generator
) -> list[SampleRequest]:
    if config.dataset_name == "random":
        return random_requests(
            config.num_prompts,
            config.random_input_len,
            config.random_output_len,
            config.random_range_ratio,
            rng,
            tokenizer,
            config.prompt_format,
        )
    if config.dataset_name == "long-doc":
        return long_doc_requests(
            config.num_prompts,
            config.long_fraction,
            config.long_input_len,
            config.short_input_len,
            config.random_output_len,
            config.random_range_ratio,
            rng,
            tokenizer,
            config.prompt_format,
        )
    if config.dataset_name == "prefix-repetition":
        return prefix_repetition_requests(
            config.num_prompts,
            config.prefix_repetition_prefix_len,
            config.prefix_repetition_suffix_len,
            config.prefix_repetition_num_prefixes,
            config.prefix_repetition_output_len,
            rng,
            tokenizer,
            config.prompt_format,
        )
    assert config.dataset_path is not None
    return jsonl_requests(
        config.dataset_path, config.num_prompts, config.random_output_len, tokenizer
    )


def build_payload(config: ServeBenchConfig, model: str, request: SampleRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model}
    if config.chat:
        if not isinstance(request.prompt, str):
            raise ValueError(
                "the chat endpoint takes text, but the prompts are token ids: pass --tokenizer "
                "DIR so prompts are built as text, or use --endpoint /v1/completions"
            )
        payload["messages"] = [{"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.expected_output_len
    else:
        payload["prompt"] = request.prompt
        payload["max_tokens"] = request.expected_output_len
    payload["stream"] = True
    # continuous_usage_stats: every chunk carries the running completion_tokens, for TBT. For a
    # server that refuses it: --extra-body '{"stream_options": {"include_usage": true}}'.
    payload["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    if config.ignore_eos:
        payload["ignore_eos"] = True
    if config.temperature is not None:
        payload["temperature"] = config.temperature
    payload.update(config.extra_body)
    return payload


async def run_requests(
    client: httpx.AsyncClient,
    config: ServeBenchConfig,
    url: str,
    payloads: list[dict[str, Any]],
    requests: list[SampleRequest],
    arrivals: list[float],
    on_done: Callable[[RequestResult], None] = lambda r: None,
) -> tuple[list[RequestResult], float]:
    """Sends payload i at arrivals[i] seconds after the start; returns results and duration."""
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

    async def one(payload: dict[str, Any], request: SampleRequest, arrived: float) -> RequestResult:
        args = (
            client,
            url,
            payload,
            config.headers,
            config.chat,
            config.request_timeout_s,
            request.prompt_len or 0,
        )
        if slots is None:
            result = await send_request(*args)
        else:
            async with slots:
                result = await send_request(*args)
        result.client_queue_time = result.start_time - arrived
        result.is_long = request.is_long
        on_done(result)
        return result

    start = time.perf_counter()
    tasks = []
    for payload, request, at in zip(payloads, requests, arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(payload, request, time.perf_counter())))
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            check=False,
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --- the benchmark --------------------------------------------------------------------------------


def _request_headers(config: ServeBenchConfig) -> dict[str, str]:
    headers = {}
    if api_key := os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"
    return {**headers, **config.headers}


async def run_benchmark(config: ServeBenchConfig) -> dict[str, Any]:
    """Runs the benchmark and returns the result dict (what --save-result writes)."""
    config = dataclasses.replace(config, headers=_request_headers(config))
    # No connection cap: a pooled request waiting for a connection would count as server TTFT.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        model, card = await fetch_model_card(client, config.base_url, config.model, config.headers)
        tokenizer_id = config.tokenizer or default_tokenizer(model, card)
        tokenizer = load_tokenizer(tokenizer_id)
        requests = build_requests(config, tokenizer, np.random.default_rng(config.seed))
        payloads = [build_payload(config, model, r) for r in requests]
        url = config.base_url + config.endpoint

        if config.num_warmups:
            print(f"warming up with {config.num_warmups} requests (not measured)...")
            warm = [payloads[0]] * config.num_warmups
            warmups, _ = await run_requests(
                client, config, url, warm, [requests[0]] * len(warm), [0.0] * len(warm)
            )
            if failed := [r.error for r in warmups if not r.success]:
                print(f"warning: {len(failed)} of {len(warm)} warm-up requests failed: {failed[0]}")

        arrivals = arrival_times(
            len(requests),
            config.request_rate,
            config.burstiness,
            np.random.default_rng([config.seed, 1]),  # apart from the dataset's stream
        )
        with ProgressBar(len(requests), config.show_progress) as on_done:
            results, duration = await run_requests(
                client, config, url, payloads, requests, arrivals, on_done
            )

    t0 = min(r.start_time for r in results)
    metrics = compute_metrics(
        results, duration, config.percentiles, config.goodput_slos_ms or None, tokenizer
    )
    info = card.get("sp_serve") if isinstance(card.get("sp_serve"), dict) else {}
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": config.backend or ENDPOINTS.get(config.endpoint, "openai"),
        "backend": config.backend or ENDPOINTS.get(config.endpoint, "openai"),
        "label": config.label,
        "model_id": model,
        "tokenizer_id": tokenizer_id,
        "num_prompts": config.num_prompts,
        "request_rate": config.request_rate if math.isfinite(config.request_rate) else "inf",
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        **config.metadata,
        "duration": duration,
        **{k: v for k, v in metrics.items() if k != "output_lens"},
        "input_lens": [r.prompt_len for r in results],
        "output_lens": metrics["output_lens"],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "tbts": [r.tbt for r in results],  # sp-serve's addition, as tbt_definition says
        "tbt_definition": TBT_DEFINITION,
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time - t0 for r in results],  # seconds from the first send
        "queue_times": [r.client_queue_time for r in results],
        "errors": [r.error for r in results],
        # sp-serve's additions
        **{
            tag: getattr(config, tag) if getattr(config, tag) is not None else info.get(tag)
            for tag in SP_SERVE_TAGS
        },
        "git_sha": info.get("git_sha") or git_sha(),
        "sp_serve": info or None,
        "base_url": config.base_url,
        "endpoint": config.endpoint,
        "dataset_name": config.dataset_name,
        "seed": config.seed,
        "ignore_eos": config.ignore_eos,
        "goodput_slos_ms": config.goodput_slos_ms or None,
        "metric_percentiles": config.percentiles,
        "request_timeout_s": config.request_timeout_s,
    }
    if config.dataset_name == "long-doc":
        result["is_long"] = [r.is_long for r in results]
    if config.save_detailed:
        result["generated_texts"] = [r.generated_text for r in results]
    return result
