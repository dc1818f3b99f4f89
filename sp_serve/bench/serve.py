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

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sp_serve.bench.arrivals import arrival_times
from sp_serve.bench.client import RequestResult, send_request
from sp_serve.bench.datasets import (
    DATASETS,
    PROMPT_FORMATS,
    SampleRequest,
    jsonl_requests,
    load_tokenizer,
    long_doc_requests,
    random_requests,
)
from sp_serve.bench.metrics import (
    METRICS,
    compute_metrics,
    parse_goodput,
    parse_percentiles,
    percentile_key,
)

ENDPOINTS = {"/v1/completions": "openai", "/v1/chat/completions": "openai-chat"}
SP_SERVE_TAGS = ("sp_size", "attn_backend", "scheduler", "device")


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first of GET /v1/models
    tokenizer: str | None = None  # None: the model's directory when it is local
    dataset_name: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    long_fraction: float = 0.1
    long_input_len: int = 32768
    short_input_len: int = 512
    prompt_format: str = "auto"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 0
    seed: int = 0
    ignore_eos: bool = False
    temperature: float | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    request_timeout_s: float = 600.0
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    percentile_metrics: list[str] = field(default_factory=lambda: list(METRICS))
    goodput_slos_ms: dict[str, float] = field(default_factory=dict)
    backend: str | None = None  # a label for the result; None: from the endpoint
    label: str | None = None
    save_result: bool = False
    save_detailed: bool = False
    result_dir: str | None = None
    result_filename: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    show_progress: bool = True
    # Tags for the result; None: what the server reports under `sp_serve` in /v1/models.
    sp_size: int | None = None
    attn_backend: str | None = None
    scheduler: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.dataset_name not in DATASETS:
            raise ValueError(f"--dataset-name {self.dataset_name!r}; choose one of {DATASETS}")
        if (self.dataset_name == "jsonl") != (self.dataset_path is not None):
            raise ValueError("--dataset-path goes with --dataset-name jsonl, and only with it")
        if not self.endpoint.startswith("/") or not self.endpoint.endswith("completions"):
            raise ValueError(
                f"--endpoint {self.endpoint!r}: use /v1/completions or /v1/chat/completions"
            )
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if not self.request_rate > 0:
            raise ValueError(
                f"--request-rate must be > 0 (inf sends all at once), got {self.request_rate}"
            )
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0 (1.0 = Poisson), got {self.burstiness}")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {self.num_warmups}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout must be > 0 s, got {self.request_timeout_s}")
        unknown = [m for m in self.percentile_metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"--percentile-metrics {unknown}: choose from {list(METRICS)}")

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("chat/completions")


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
    payload["stream_options"] = {"include_usage": True}
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
        with _Progress(len(requests), config.show_progress) as on_done:
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


class _Progress:
    """A rich progress bar as a context manager yielding the per-request callback."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.failed = total, enabled, 0

    def __enter__(self) -> Callable[[RequestResult], None]:
        if not self.enabled:
            return lambda result: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("bench", total=self.total, failed="")
        self.bar.start()

        def on_done(result: RequestResult) -> None:
            self.failed += not result.success
            failed = f"[red]{self.failed} failed" if self.failed else ""
            self.bar.update(self.task, advance=1, failed=failed)

        return on_done

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


# --- output ---------------------------------------------------------------------------------------


def result_path(config: ServeBenchConfig, result: dict[str, Any]) -> Path:
    """vLLM's default name: {label}-{rate}qps[-concurrency{n}]-{model}-{date}.json."""
    if config.result_filename:
        name = config.result_filename
    else:
        concurrency = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
        label = config.label or result["backend"]
        model = str(result["model_id"]).rstrip("/").split("/")[-1]
        name = f"{label}-{result['request_rate']}qps{concurrency}-{model}-{result['date']}.json"
    directory = Path(config.result_dir or ".")
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


_METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
    "short_ttft": ("TTFT short", "TTFT of short requests (long-doc)"),
    "long_ttft": ("TTFT long", "TTFT of long requests (long-doc)"),
}


def print_summary(result: dict[str, Any], config: ServeBenchConfig, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="Serving Benchmark Result", show_header=False, title_style="bold")
    table.add_column(min_width=40)
    table.add_column(justify="right", min_width=12)
    rows: list[tuple[str, Any]] = [
        ("Successful requests:", result["completed"]),
        ("Failed requests:", result["failed"]),
    ]
    if config.max_concurrency is not None:
        rows.append(("Maximum request concurrency:", config.max_concurrency))
    if math.isfinite(config.request_rate):
        rows.append(("Request rate configured (RPS):", f"{config.request_rate:.2f}"))
    rows += [
        ("Benchmark duration (s):", f"{result['duration']:.2f}"),
        ("Total input tokens:", result["total_input_tokens"]),
        ("Total generated tokens:", result["total_output_tokens"]),
        ("Request throughput (req/s):", f"{result['request_throughput']:.2f}"),
    ]
    if result["request_goodput"] is not None:
        rows.append(("Request goodput (req/s):", f"{result['request_goodput']:.2f}"))
    rows += [
        ("Output token throughput (tok/s):", f"{result['output_throughput']:.2f}"),
        ("Peak output token throughput (tok/s):", f"{result['max_output_tokens_per_s']:.2f}"),
        ("Peak concurrent requests:", f"{result['max_concurrent_requests']:.2f}"),
        ("Total token throughput (tok/s):", f"{result['total_token_throughput']:.2f}"),
    ]
    for label, value in rows:
        table.add_row(label, str(value))
    names = [m for m in config.percentile_metrics]
    if "is_long" in result:
        names += ["short_ttft", "long_ttft"]
    for name in names:
        short, header = _METRIC_TITLES[name]
        table.add_section()
        table.add_row(f"[bold]{header}[/bold]", "")
        table.add_row(f"Mean {short} (ms):", f"{result[f'mean_{name}_ms']:.2f}")
        table.add_row(f"Median {short} (ms):", f"{result[f'median_{name}_ms']:.2f}")
        for p in config.percentiles:
            key = percentile_key(p)
            table.add_row(f"{key.upper()} {short} (ms):", f"{result[f'{key}_{name}_ms']:.2f}")
    console.print(table)
    errors = Counter(e for e in result["errors"] if e)
    if errors:
        console.print(f"[red]{result['failed']} failed request(s); distinct errors:[/red]")
        for message, count in errors.most_common(10):
            console.print(f"  {count} x {message}", highlight=False, markup=False, soft_wrap=True)


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=None, help="default http://HOST:PORT")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default="/v1/completions", help="or /v1/chat/completions")
    server.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    server.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer dir for exact prompt lengths and output counts (default: the model's "
        "dir when local; without one, prompts go as token ids and counts come from usage)",
    )
    server.add_argument(
        "--backend", default=None, help="label for the result (default: from --endpoint)"
    )
    server.add_argument("--label", default=None, help="prefix of the result file name")
    server.add_argument(
        "--header", nargs="*", default=[], metavar="KEY=VALUE", help="extra HTTP headers"
    )
    server.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds per request (600)"
    )

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", default="random", choices=DATASETS)
    data.add_argument(
        "--dataset-path", default=None, help='jsonl: one {"prompt", "output_len"} per line'
    )
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--input-len", type=int, default=None, help="sets --random-input-len")
    data.add_argument("--output-len", type=int, default=None, help="sets --random-output-len")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument(
        "--random-output-len",
        type=int,
        default=128,
        help="also the output length of long-doc requests and of jsonl lines without output_len",
    )
    data.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths drawn in len x [1-r, 1+r]"
    )
    data.add_argument(
        "--long-fraction", type=float, default=0.1, help="long-doc: share of long requests"
    )
    data.add_argument("--long-input-len", type=int, default=32768)
    data.add_argument("--short-input-len", type=int, default=512)
    data.add_argument(
        "--prompt-format",
        default="auto",
        choices=PROMPT_FORMATS,
        help="random/long-doc prompts as text or as token-id lists (auto: text with a tokenizer)",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate", type=float, default=math.inf, help="req/s; inf sends all at once"
    )
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1.0 = Poisson")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--num-warmups", type=int, default=0)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--ignore-eos", action="store_true")
    load.add_argument("--temperature", type=float, default=None)
    load.add_argument(
        "--extra-body",
        type=_json_object,
        default=None,
        help="JSON object merged into every request",
    )

    report = parser.add_argument_group("report")
    report.add_argument("--metric-percentiles", default="50,90,99")
    report.add_argument(
        "--percentile-metrics", default=",".join(METRICS), help="which the table shows"
    )
    report.add_argument(
        "--goodput", nargs="+", default=None, metavar="KEY:MS", help="e.g. ttft:500 tpot:50"
    )
    report.add_argument("--save-result", action="store_true")
    report.add_argument("--save-detailed", action="store_true", help="also save generated texts")
    report.add_argument("--result-dir", default=None)
    report.add_argument("--result-filename", default=None)
    report.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE")
    report.add_argument(
        "--disable-tqdm", "--disable-progress", dest="disable_progress", action="store_true"
    )
    report.add_argument("--sp-size", type=int, default=None, help="tag (default: from the server)")
    report.add_argument("--attn-backend", default=None, help="tag (default: from the server)")
    report.add_argument("--scheduler", default=None, help="tag (default: from the server)")
    report.add_argument("--device", default=None, help="tag (default: from the server)")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON object; write e.g. '{{\"top_k\": 1}}'"
        )
    return value


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: write KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    return ServeBenchConfig(
        base_url=(args.base_url or f"http://{args.host}:{args.port}").rstrip("/"),
        endpoint=args.endpoint,
        model=args.model,
        tokenizer=args.tokenizer,
        dataset_name=args.dataset_name,
        dataset_path=args.dataset_path,
        num_prompts=args.num_prompts,
        random_input_len=args.input_len or args.random_input_len,
        random_output_len=args.output_len or args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        long_fraction=args.long_fraction,
        long_input_len=args.long_input_len,
        short_input_len=args.short_input_len,
        prompt_format=args.prompt_format,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        extra_body=args.extra_body or {},
        headers=_key_values(args.header, "--header"),
        request_timeout_s=args.request_timeout,
        percentiles=parse_percentiles(args.metric_percentiles),
        percentile_metrics=[m.strip() for m in args.percentile_metrics.split(",") if m.strip()],
        goodput_slos_ms=parse_goodput(args.goodput),
        backend=args.backend,
        label=args.label,
        save_result=args.save_result,
        save_detailed=args.save_detailed,
        result_dir=args.result_dir,
        result_filename=args.result_filename,
        metadata=_key_values(args.metadata, "--metadata"),
        show_progress=not args.disable_progress,
        sp_size=args.sp_size,
        attn_backend=args.attn_backend,
        scheduler=args.scheduler,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    """0 when at least one request completed, 1 when all failed, 2 on a usage error."""
    try:
        config = config_from_args(args)
        result = asyncio.run(run_benchmark(config))
    except ValueError as exc:
        print(f"sp-serve bench serve: {exc}", file=sys.stderr)
        return 2
    print_summary(result, config)
    if config.save_result:
        path = result_path(config, result)
        path.write_text(json.dumps(result))
        print(f"result saved to {path}")
    return 0 if result["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point until the lead wires `sp-serve bench serve`."""
    parser = argparse.ArgumentParser(
        prog="sp-serve bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
