"""`sp-serve bench sweep`: one fresh `sp-serve serve` per combination of TP and SP degree,
prompt length, request rate and scheduler, each measured by the `bench serve` client; JSON,
CSV, plots.

    sp-serve bench sweep --result-dir sweeps/cpu --sp-size 1 2 --input-len 512 2048 \\
        --request-rate 1 inf --scheduler slo fcfs --num-prompts 20 --output-len 32 \\
        --server-args "--model DIR --kv-cache-memory 1GiB"

--tp-size (default 1) adds tensor parallelism: each server runs --tensor-parallel-size T
--sp-size S on T x S ranks; a run with T > 1 is named tpT-spS-..., and every row records both.

For each run: start the server (a subprocess in its own session, on a free port, its output in
logs/RUN.log), wait for /health, run the benchmark (a library call), stop the server (SIGTERM,
wait, confirm that it and its ranks are gone), write RUN.json (the bench result plus a `sweep`
block). A run whose JSON exists is skipped, so an interrupted sweep resumes where it stopped. A
run that fails (the server does not come up, or no request completes) is reported with the
server log's tail, recorded in RUN.failed.json and summary.csv, and retried by the next sweep.

At the end, from every run of the grid: summary.csv (one row per run, status ok / failed /
not-run) and PNG plots: TTFT vs prompt length per TP x SP layout, the TBT (ITL) distribution per
scheduler, throughput vs request rate, and parallel efficiency against one rank (TP=1, SP=1).
Throughput efficiency = throughput(N = TP x SP ranks) / (N x throughput(1 rank)) at the same
length, rate and scheduler;
it means something only at a rate that saturates the server (e.g. inf). Prefill efficiency uses
prefill speed = prompt tokens / median TTFT, which is cleanest at a low rate (no queueing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sp_serve.bench.config import ServeBenchConfig
from sp_serve.bench.metrics import parse_goodput
from sp_serve.bench.serve import run_benchmark
from sp_serve.parallel.launch import free_port

SCHEDULERS = ("slo", "fcfs")
# Flags the sweep sets on every server itself.
_OWNED_SERVER_FLAGS = ("--host", "--port", "--sp-size", "-sp", "--sequence-parallel-size",
                       "--tensor-parallel-size", "-tp", "--scheduler")
LOG_TAIL_LINES = 30
SUMMARY_FIELDS = [
    "run", "status", "tp_size", "sp_size", "scheduler", "input_len", "request_rate", "num_prompts",
    "completed", "failed", "duration_s", "request_throughput", "output_throughput",
    "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
    "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms",
    "median_e2el_ms", "p99_e2el_ms", "request_goodput", "prefill_tokens_per_s",
    "throughput_efficiency", "prefill_efficiency", "server_start_s", "result_file",
    "server_log", "error",
]


@dataclass(frozen=True)
class SweepRun:
    sp_size: int
    input_len: int
    request_rate: float
    scheduler: str
    tp_size: int = 1

    @property
    def name(self) -> str:
        """spS-... as before TP existed (so older result directories resume), tpT-spS-..."""
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        tp = f"tp{self.tp_size}-" if self.tp_size != 1 else ""
        return f"{tp}sp{self.sp_size}-in{self.input_len}-rate{rate}-{self.scheduler}"

    @property
    def label(self) -> str:
        tp = f"tp={self.tp_size} " if self.tp_size != 1 else ""
        return (f"{tp}sp={self.sp_size} in={self.input_len} rate={self.request_rate:g} "
                f"{self.scheduler}")


@dataclass
class SweepConfig:
    result_dir: str
    sp_sizes: list[int] = field(default_factory=lambda: [1])
    tp_sizes: list[int] = field(default_factory=lambda: [1])
    input_lens: list[int] = field(default_factory=lambda: [1024])
    request_rates: list[float] = field(default_factory=lambda: [math.inf])
    schedulers: list[str] = field(default_factory=lambda: ["slo"])
    server_args: list[str] = field(default_factory=list)
    # The benchmark of every run; base_url, the prompt length and the rate are set per run.
    bench: ServeBenchConfig = field(default_factory=ServeBenchConfig)
    server_start_timeout_s: float = 600.0
    server_stop_timeout_s: float = 30.0
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name, values in (("--sp-size", self.sp_sizes), ("--tp-size", self.tp_sizes),
                             ("--input-len", self.input_lens),
                             ("--request-rate", self.request_rates),
                             ("--scheduler", self.schedulers)):
            if not values:
                raise ValueError(f"{name} needs at least one value")
        if min(self.sp_sizes) < 1:
            raise ValueError(f"--sp-size values must be >= 1, got {self.sp_sizes}")
        if min(self.tp_sizes) < 1:
            raise ValueError(f"--tp-size values must be >= 1, got {self.tp_sizes}")
        if min(self.input_lens) < 1:
            raise ValueError(f"--input-len values must be >= 1, got {self.input_lens}")
        if not all(r > 0 for r in self.request_rates):
            raise ValueError(f"--request-rate values must be > 0 (inf: all at once), "
                             f"got {self.request_rates}")
        if bad := [s for s in self.schedulers if s not in SCHEDULERS]:
            raise ValueError(f"--scheduler {bad}: choose from {list(SCHEDULERS)}")
        owned = [a for a in self.server_args if a.split("=")[0] in _OWNED_SERVER_FLAGS]
        if owned:
            raise ValueError(f"--server-args must not set {owned}: the sweep sets the host, port, "
                             "--tensor-parallel-size, --sp-size and --scheduler of every server "
                             "(use the sweep's --tp-size, --sp-size and --scheduler)")
        if self.bench.dataset_name not in ("random", "long-doc"):
            raise ValueError(
                "a sweep varies the prompt length: use --dataset-name random or long-doc")

    @property
    def runs(self) -> list[SweepRun]:
        return [SweepRun(sp, n, rate, sched, tp) for tp in self.tp_sizes for sp in self.sp_sizes
                for n in self.input_lens for rate in self.request_rates
                for sched in self.schedulers]


class ServerStartError(RuntimeError):
    pass


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(the server log is empty)"


class Server:
    """One `sp-serve serve` subprocess in its own session (so its ranks can be found and
    stopped with it), logging to a file."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "sp_serve.cli", "serve", *args,
                    "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self, timeout_s: float, on_wait=lambda elapsed: None) -> float:
        """Starts the server and waits until /health answers 200; returns the seconds it took.
        ServerStartError if it exits first or does not answer within timeout_s."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"$ {shlex.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        t0 = time.monotonic()
        with httpx.Client(timeout=2.0) as client:
            while True:
                elapsed = time.monotonic() - t0
                code = self.proc.poll()
                if code is not None:
                    self.returncode = code
                    raise ServerStartError(f"the server exited with code {code} before /health "
                                           f"answered ({elapsed:.0f} s)")
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return elapsed
                except httpx.HTTPError:
                    pass
                if elapsed > timeout_s:
                    raise ServerStartError(f"/health did not answer within {timeout_s:.0f} s "
                                           "(--server-start-timeout)")
                on_wait(elapsed)
                time.sleep(0.25)

    def stop(self, timeout_s: float) -> str:
        """SIGTERM, wait, then SIGKILL for the whole session if needed; returns a note on how
        it ended ('' when it stopped cleanly)."""
        if self.proc is None:
            return ""
        note = ""
        pgid = self.proc.pid  # start_new_session: the server leads its own process group
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                note = f"the server ignored SIGTERM for {timeout_s:.0f} s and was killed"
                _kill_group(pgid)
                self.proc.wait()
        self.returncode = self.proc.returncode
        # 0 is a clean stop; so is -15 from servers whose uvicorn re-raised the SIGTERM it handled.
        if self.returncode not in (0, -signal.SIGTERM) and not note:
            note = f"the server exited with code {self.returncode}"
        # Its ranks share its process group; give them a moment to notice, then make sure.
        deadline = time.monotonic() + 5.0
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(pgid):
            _kill_group(pgid)
            note = (note + "; " if note else "") + "server ranks outlived it and were killed"
        return note


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# --- running the grid -----------------------------------------------------------------------------


@dataclass
class RunOutcome:
    run: SweepRun
    status: str  # ok | skipped | failed
    message: str = ""


def _bench_config(config: SweepConfig, run: SweepRun, base_url: str) -> ServeBenchConfig:
    lengths = ({"random_input_len": run.input_len} if config.bench.dataset_name == "random"
               else {"long_input_len": run.input_len})
    return dataclasses.replace(
        config.bench, base_url=base_url, request_rate=run.request_rate, show_progress=False,
        save_result=False, sp_size=None, tp_size=None, scheduler=None, label=run.name,
        **lengths)


def run_one(config: SweepConfig, run: SweepRun, status=lambda text: None) -> dict[str, Any]:
    """Starts the run's server, benchmarks it, stops it; returns the result with a `sweep`
    block. Raises ServerStartError, or ValueError from the benchmark; the server is always
    stopped."""
    out = Path(config.result_dir)
    server_args = [*config.server_args, "--tensor-parallel-size", str(run.tp_size),
                   "--sp-size", str(run.sp_size), "--scheduler", run.scheduler]
    server = Server(server_args, out / "logs" / f"{run.name}.log")
    try:
        started = server.start(config.server_start_timeout_s,
                               lambda s: status(f"starting the server ({s:.0f} s)"))
        status("benchmarking")
        result = asyncio.run(run_benchmark(_bench_config(config, run, server.base_url)))
    finally:
        status("stopping the server")
        stop_note = server.stop(config.server_stop_timeout_s)
    result["sweep"] = {
        "run": run.name,
        "tp_size": run.tp_size,
        "sp_size": run.sp_size,
        "input_len": run.input_len,
        "request_rate": run.request_rate if math.isfinite(run.request_rate) else "inf",
        "scheduler": run.scheduler,
        "server_cmd": server.cmd,
        "server_start_s": started,
        "server_returncode": server.returncode,
        "server_stop_note": stop_note,
        "server_log": str(server.log_path.relative_to(out)),
    }
    return result


def run_sweep(config: SweepConfig, console: Any = None) -> list[RunOutcome]:
    """Every run of the grid not done yet, then summary.csv and the plots."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    out = Path(config.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = console or Console()
    runs = config.runs
    outcomes: list[RunOutcome] = []
    progress = Progress(SpinnerColumn(), TextColumn("[bold]sweep"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console,
                        disable=not config.show_progress, transient=True)
    with progress:
        task = progress.add_task("", total=len(runs))
        for i, run in enumerate(runs, start=1):
            result_file, failed_file = out / f"{run.name}.json", out / f"{run.name}.failed.json"
            if result_file.exists():
                outcomes.append(RunOutcome(run, "skipped", "result exists"))
                console.print(f"[dim]skip[/dim] {run.name} (result exists)", highlight=False)
                progress.advance(task)
                continue

            def status(text: str, run: SweepRun = run, i: int = i) -> None:
                progress.update(task, description=f"[{i}/{len(runs)}] {run.label}: {text}")

            t0 = time.monotonic()
            try:
                result = run_one(config, run, status)
                if not result["completed"]:
                    first = next((e for e in result["errors"] if e), "")
                    raise ServerStartError(f"no request completed; first error: {first}")
            except Exception as exc:  # noqa: BLE001 -- one run's failure must not end the sweep
                log = out / "logs" / f"{run.name}.log"
                tail = log_tail(log)
                if not isinstance(exc, (ServerStartError, ValueError)):
                    exc = RuntimeError(f"{type(exc).__name__}: {exc}")
                message = f"run {run.name} failed: {exc}"
                console.print(f"[red]FAILED[/red] {message}\n[dim]last lines of {log}:[/dim]",
                              highlight=False)
                console.print(tail, highlight=False, markup=False)
                failed_file.write_text(json.dumps({
                    "run": run.name, **dataclasses.asdict(run), "error": str(exc),
                    "server_log": str(log.relative_to(out)), "server_log_tail": tail,
                }, default=str))
                outcomes.append(RunOutcome(run, "failed", message))
            else:
                result_file.write_text(json.dumps(result))
                failed_file.unlink(missing_ok=True)
                seconds = time.monotonic() - t0
                console.print(
                    f"[green]done[/green] {run.name}: {result['completed']}/{len(result['ttfts'])}"
                    f" ok, TTFT p50 {result['median_ttft_ms']:.0f} ms, ITL p50 "
                    f"{result['median_itl_ms']:.1f} ms, {result['output_throughput']:.1f} tok/s "
                    f"({seconds:.0f} s)", highlight=False)
                outcomes.append(RunOutcome(run, "ok"))
            progress.advance(task)
    rows = write_summary(config)
    plots = make_plots(out, rows, load_results(out, rows))
    done = sum(r["status"] == "ok" for r in rows)
    console.print(f"{done}/{len(rows)} runs have results; {out / 'summary.csv'} and "
                  f"{len(plots)} plots in {out}", highlight=False)
    return outcomes


# --- summary and plots ----------------------------------------------------------------------------


def _efficiency(rows: list[dict[str, Any]], key: str, out_key: str) -> None:
    """value(N = TP x SP ranks) / (N x value(one rank)) at the same length, rate, scheduler."""
    base = {(r["input_len"], r["request_rate"], r["scheduler"]): r[key]
            for r in rows if r["status"] == "ok" and _ranks(r) == 1 and r[key]}
    for r in rows:
        ref = base.get((r["input_len"], r["request_rate"], r["scheduler"]))
        if r["status"] == "ok" and ref and r[key] is not None:
            r[out_key] = r[key] / (_ranks(r) * ref)


def _ranks(row: dict[str, Any]) -> int:
    return row["sp_size"] * row["tp_size"]


def _layout(tp: int, sp: int) -> str:
    return f"TP={tp} SP={sp}" if tp != 1 else f"SP={sp}"


def summary_rows(config: SweepConfig) -> list[dict[str, Any]]:
    out = Path(config.result_dir)
    rows = []
    for run in config.runs:
        row: dict[str, Any] = {k: None for k in SUMMARY_FIELDS}
        row.update(run=run.name, tp_size=run.tp_size, sp_size=run.sp_size,
                   scheduler=run.scheduler,
                   input_len=run.input_len, request_rate=run.request_rate,
                   num_prompts=config.bench.num_prompts)
        result_file, failed_file = out / f"{run.name}.json", out / f"{run.name}.failed.json"
        if result_file.exists():
            result = json.loads(result_file.read_text())
            row["status"] = "ok"
            row["result_file"] = result_file.name
            for key in SUMMARY_FIELDS:
                if key in result and key not in ("num_prompts", "request_rate"):
                    # the layout as the server reported it; the run's own when it did not say
                    if key in ("sp_size", "tp_size") and result[key] is None:
                        continue
                    row[key] = result[key]
            sweep = result.get("sweep", {})
            row["duration_s"] = result["duration"]
            row["server_start_s"] = sweep.get("server_start_s")
            row["server_log"] = sweep.get("server_log")
            lens = [n for n, e in zip(result["input_lens"], result["errors"]) if not e]
            if lens and result.get("median_ttft_ms"):
                mean_len = sum(lens) / len(lens)
                row["prefill_tokens_per_s"] = mean_len / (result["median_ttft_ms"] / 1e3)
            row["error"] = sweep.get("server_stop_note") or None
        elif failed_file.exists():
            failure = json.loads(failed_file.read_text())
            row.update(status="failed", error=failure["error"], server_log=failure["server_log"])
        else:
            row["status"] = "not-run"
        rows.append(row)
    _efficiency(rows, "output_throughput", "throughput_efficiency")
    _efficiency(rows, "prefill_tokens_per_s", "prefill_efficiency")
    return rows


def write_summary(config: SweepConfig) -> list[dict[str, Any]]:
    rows = summary_rows(config)
    with open(Path(config.result_dir) / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return rows


def load_results(out: Path, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["run"]: json.loads((out / r["result_file"]).read_text())
            for r in rows if r["status"] == "ok"}


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _series(rows: list[dict[str, Any]], *keys: str) -> Iterator[tuple[tuple, list[dict]]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    yield from sorted(groups.items(), key=lambda kv: [str(v) for v in kv[0]])


def make_plots(out: Path, rows: list[dict[str, Any]], results: dict[str, dict[str, Any]]
               ) -> list[Path]:
    """The four PNGs; a plot without data says so instead of being left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    def empty(ax, text: str) -> None:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)

    # 1. TTFT vs prompt length, a line per SP degree (and scheduler), a panel per rate.
    rates = sorted({r["request_rate"] for r in rows})
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.2), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for (tp, sp, sched), group in _series([r for r in ok if r["request_rate"] == rate],
                                              "tp_size", "sp_size", "scheduler"):
            group.sort(key=lambda r: r["input_len"])
            ax.plot([r["input_len"] for r in group], [r["median_ttft_ms"] for r in group],
                    marker="o", linestyle="-" if sched == "slo" else "--",
                    label=f"{_layout(tp, sp)} {sched}")
        ax.set(title=f"rate {_rate_label(rate)} req/s", xlabel="prompt length (tokens)",
               ylabel="median TTFT (ms)")
        if ax.lines:
            ax.legend()
            ax.set_xscale("log", base=2)
        else:
            empty(ax, "no completed runs")
    save(fig, "ttft_vs_prompt_len.png")

    # 2. TBT (ITL) distribution per scheduler (and SP degree): an empirical CDF over every
    # gap of those runs, whatever their prompt length and rate.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    layouts = sorted({(r["tp_size"], r["sp_size"]) for r in rows})
    colors = {s: f"C{i}" for i, s in enumerate(SCHEDULERS)}
    for (sched, tp, sp), group in _series(ok, "scheduler", "tp_size", "sp_size"):
        gaps = sorted(g * 1e3 for r in group for req in results[r["run"]]["itls"] for g in req)
        if gaps:
            n = len(gaps)
            ax.step(gaps, [(i + 1) / n for i in range(n)], where="post", color=colors[sched],
                    linestyle=styles[layouts.index((tp, sp)) % len(styles)],
                    label=f"{sched} {_layout(tp, sp)}: p50 {gaps[n // 2]:.1f} ms, p99 "
                    f"{gaps[min(n - 1, int(0.99 * n))]:.1f} ms")
    ax.set(title="TBT (inter-token latency) per scheduler, all lengths and rates",
           xlabel="ITL (ms)", ylabel="fraction of gaps <= x")
    if ax.lines:
        ax.legend()
        ax.set_xscale("log")
    else:
        empty(ax, "no token gaps measured")
    save(fig, "itl_cdf_by_scheduler.png")

    # 3. Output throughput vs request rate (inf at the right end), a panel per prompt length.
    lens = sorted({r["input_len"] for r in rows})
    positions = {rate: i for i, rate in enumerate(rates)}
    fig, axes = plt.subplots(1, len(lens), figsize=(5.5 * len(lens), 4.2), squeeze=False)
    for ax, n in zip(axes[0], lens):
        for (tp, sp, sched), group in _series([r for r in ok if r["input_len"] == n],
                                              "tp_size", "sp_size", "scheduler"):
            group.sort(key=lambda r: r["request_rate"])
            ax.plot([positions[r["request_rate"]] for r in group],
                    [r["output_throughput"] for r in group], marker="o",
                    linestyle="-" if sched == "slo" else "--",
                    label=f"{_layout(tp, sp)} {sched}")
        ax.set_xticks(range(len(rates)), [_rate_label(r) for r in rates])
        ax.set(title=f"prompt {n} tokens", xlabel="request rate (req/s)",
               ylabel="output throughput (tok/s)")
        if ax.lines:
            ax.legend()
        else:
            empty(ax, "no completed runs")
    save(fig, "throughput_vs_rate.png")

    # 4. Parallel efficiency against one rank (TP=1, SP=1) at the same prompt length, rate and
    # scheduler, over the ranks used (TP x SP); a line per TP degree.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    multi_tp = len({tp for tp, _ in layouts}) > 1
    for ax, key, title in ((axes[0], "throughput_efficiency", "throughput"),
                           (axes[1], "prefill_efficiency", "prefill speed (tokens / TTFT)")):
        for (n, rate, sched, tp), group in _series(ok, "input_len", "request_rate", "scheduler",
                                                   "tp_size"):
            group = sorted((r for r in group if r[key] is not None), key=_ranks)
            if len(group) > 1 or (group and _ranks(group[0]) > 1):
                ax.plot([_ranks(r) for r in group], [r[key] for r in group], marker="o",
                        label=f"{f'TP={tp} ' if multi_tp else ''}{n} tok, "
                        f"{_rate_label(rate)} req/s, {sched}")
        ax.axhline(1.0, color="grey", linestyle=":", label="ideal")
        ax.set_xticks(sorted({tp * sp for tp, sp in layouts}))
        ax.set(title=f"parallel efficiency: {title}", xlabel="ranks (TP x SP)",
               ylabel="value(N ranks) / (N x value(1 rank))", ylim=(0, None))
        if len(ax.lines) > 1:
            ax.legend(fontsize="small")
        else:
            empty(ax, "needs runs on 1 rank and on several of the same length, rate and "
                  "scheduler")
    save(fig, "parallel_efficiency.png")
    return paths


# --- the command ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("the grid (one server per combination)")
    grid.add_argument("--result-dir", required=True,
                      help="where RUN.json, summary.csv, the plots and logs/ go")
    grid.add_argument("--sp-size", "-sp", dest="sp_sizes", type=int, nargs="+", default=[1])
    grid.add_argument("--tp-size", "--tensor-parallel-size", "-tp", dest="tp_sizes", type=int,
                      nargs="+", default=[1],
                      help="tensor-parallel degrees: each server runs tp x sp ranks (default 1)")
    grid.add_argument("--input-len", "--prompt-len", dest="input_lens", type=int, nargs="+",
                      default=[1024], help="prompt tokens (long-doc: of the long requests)")
    grid.add_argument("--request-rate", dest="request_rates", type=float, nargs="+",
                      default=[math.inf], help="req/s, Poisson; inf sends all at once")
    grid.add_argument("--scheduler", dest="schedulers", nargs="+", default=["slo"],
                      choices=SCHEDULERS)
    server = parser.add_argument_group("the servers")
    server.add_argument("--server-args", default="",
                        help='passed to every `sp-serve serve`, e.g. "--model DIR '
                        '--kv-cache-memory 1GiB --cost-model cost.json" (a single flag: '
                        '--server-args=--flag)')
    server.add_argument("--server-start-timeout", type=float, default=600.0,
                        help="seconds to wait for /health (600)")
    server.add_argument("--server-stop-timeout", type=float, default=30.0,
                        help="seconds after SIGTERM before SIGKILL (30)")
    bench = parser.add_argument_group("each benchmark (as `bench serve`)")
    bench.add_argument("--dataset-name", default="random", choices=["random", "long-doc"])
    bench.add_argument("--num-prompts", type=int, default=100)
    bench.add_argument("--output-len", type=int, default=128)
    bench.add_argument("--random-range-ratio", type=float, default=0.0)
    bench.add_argument("--long-fraction", type=float, default=0.1)
    bench.add_argument("--short-input-len", type=int, default=512)
    bench.add_argument("--max-concurrency", type=int, default=None)
    bench.add_argument("--num-warmups", type=int, default=1,
                       help="unmeasured requests on each fresh server first (1)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                       help="generate exactly --output-len tokens (default: yes)")
    bench.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS")
    bench.add_argument("--tokenizer", default=None)
    bench.add_argument("--endpoint", default="/v1/completions")
    bench.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--disable-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    bench = ServeBenchConfig(
        endpoint=args.endpoint, tokenizer=args.tokenizer, dataset_name=args.dataset_name,
        num_prompts=args.num_prompts, random_output_len=args.output_len,
        random_range_ratio=args.random_range_ratio, long_fraction=args.long_fraction,
        short_input_len=args.short_input_len, max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups, seed=args.seed, ignore_eos=args.ignore_eos,
        goodput_slos_ms=parse_goodput(args.goodput), request_timeout_s=args.request_timeout)
    return SweepConfig(
        result_dir=args.result_dir, sp_sizes=args.sp_sizes, tp_sizes=args.tp_sizes,
        input_lens=args.input_lens,
        request_rates=args.request_rates, schedulers=args.schedulers,
        server_args=shlex.split(args.server_args), bench=bench,
        server_start_timeout_s=args.server_start_timeout,
        server_stop_timeout_s=args.server_stop_timeout,
        show_progress=not args.disable_progress)


def run(args: argparse.Namespace) -> int:
    """0 when every run of the grid has a result, 1 when some failed, 2 on a usage error."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"sp-serve bench sweep: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    outcomes = run_sweep(config)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sp-serve bench sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
