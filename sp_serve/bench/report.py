"""What a benchmark shows: a progress bar while it runs, the summary table after (laid out
like vLLM's "Serving Benchmark Result"), and the result file's name."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sp_serve.bench.client import RequestResult
from sp_serve.bench.config import ServeBenchConfig
from sp_serve.bench.metrics import TBT_DEFINITION, percentile_key


class ProgressBar:
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
    "tbt": ("TBT", "Time between Tokens"),
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
    if result.get("prefix_cache_hit_rate") is not None:
        rows += [
            ("Cached prompt tokens:", result["total_cached_tokens"]),
            ("Prefix cache hit rate (%):", f"{100 * result['prefix_cache_hit_rate']:.2f}"),
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
        if name == "tbt":
            table.add_row(f"[dim]({TBT_DEFINITION})[/dim]", "")
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
