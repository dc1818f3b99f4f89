"""`sp-serve plan`: the analytic model of sp_serve.planner.analytic as a table or JSON.

With no flags it prints the paper's running example: Yi-34B-200K, 50K context, one A100-80GB.
Several --tp-size / --sp-size values (optionally only those making --num-gpus) compare the
layouts side by side, each with the `sp-serve serve` flags and torchrun line that run it, e.g.

    sp-serve plan --model llama-3.1-70b --hardware h100-sxm --num-gpus 8 -tp 8 4 2 -sp 1 2 4 \\
        --context-len 131072

With --simulate it runs sp_serve.planner.simulator (the engine's scheduler on a workload) for
every combination of --tp-size, --sp-size, --scheduler, --ttft-slo-ms and --tbt-slo-ms, e.g.

    sp-serve plan --simulate --model llama-3.1-8b --hardware h100-sxm -sp 4 8 \\
        --dataset-name long-doc --long-input-len 1000000 --short-input-len 2000 \\
        --num-prompts 50 --request-rate 0.5 --scheduler slo fcfs --goodput ttft:2000 tpot:100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from sp_serve.planner.analytic import (
    ATTN_FLOPS_CONVENTIONS,
    DTYPE_BYTES,
    MODEL_PRESETS,
    Deployment,
    PlanResult,
    plan,
    resolve_model,
)
from sp_serve.planner.hardware import GB, HARDWARE_PRESETS, Hardware, get_hardware, parse_bytes

DEFAULT_MODEL = "yi-34b-200k"  # the paper's running example

# CLI flag -> Hardware field and the factor from the flag's unit to the field's unit.
_HW_OVERRIDES = {
    "peak_tflops": ("peak_flops", 1e12),
    "hbm_bw_gbs": ("hbm_bandwidth", 1e9),
    "interconnect_bw_gbs": ("interconnect_bandwidth", 1e9),
    "pcie_bw_gbs": ("pcie_bandwidth", 1e9),
}
_OPTIONAL_HW = {"inter_node_bw_gbs": ("inter_node_bandwidth", 1e9)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help=f"preset {sorted(MODEL_PRESETS)} or a path to a Hugging Face config.json / "
        "checkpoint dir (default: yi-34b-200k, the paper's example)",
    )
    model.add_argument("--weight-dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    model.add_argument("--kv-dtype", default="bf16", choices=sorted(DTYPE_BYTES))

    hw = parser.add_argument_group(
        "hardware (a preset, each field overridable; 'custom' needs all)"
    )
    hw.add_argument(
        "--hardware",
        default="a100-80g",
        help=f"{sorted(HARDWARE_PRESETS)} or custom (default: a100-80g)",
    )
    hw.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s per GPU (1e12 FLOP/s)")
    hw.add_argument(
        "--hbm", type=parse_bytes, help="HBM per GPU with a unit: 80GiB, 85.9GB, 8.59e10"
    )
    hw.add_argument("--hbm-bw-gbs", type=float, help="HBM bandwidth per GPU, GB/s (1e9 bytes/s)")
    hw.add_argument(
        "--interconnect-bw-gbs", type=float, help="GPU-to-GPU bandwidth per GPU per direction, GB/s"
    )
    hw.add_argument("--pcie-bw-gbs", type=float, help="host<->GPU bandwidth per direction, GB/s")
    hw.add_argument(
        "--inter-node-bw-gbs",
        type=float,
        help="GPU-to-GPU bandwidth between nodes per GPU per direction, GB/s (its NIC; presets: "
        "25 for a100-80g, 50 for h100-sxm and h200)",
    )

    dep = parser.add_argument_group("deployment")
    dep.add_argument(
        "--sp-size",
        "--sequence-parallel-size",
        "-sp",
        type=int,
        nargs="+",
        default=[1],
        help="SP degree (sp-serve serve's --sp-size); several compare side by side (default 1)",
    )
    dep.add_argument(
        "--tp-size",
        "--tensor-parallel-size",
        "-tp",
        type=int,
        nargs="+",
        default=[1],
        help="TP degree inside each SP rank (sp-serve serve's --tensor-parallel-size); the "
        "GPUs are tp x sp; several compare side by side (default 1)",
    )
    dep.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="compare only the --tp-size x --sp-size combinations using this many GPUs",
    )
    dep.add_argument(
        "--gpus-per-node",
        type=int,
        default=8,
        help="GPUs per node (torchrun's --nproc-per-node); more GPUs than this span nodes "
        "(default 8)",
    )
    dep.add_argument(
        "--context-len", type=int, default=50_000, help="prompt tokens per request (default 50000)"
    )
    dep.add_argument(
        "--output-len", type=int, default=250, help="generated tokens per request (default 250)"
    )
    dep.add_argument(
        "--batch-size", type=int, default=1, help="requests decoded together (default 1)"
    )
    dep.add_argument(
        "--flops-efficiency",
        type=float,
        default=1.0,
        help="achieved / peak FLOP/s (default 1.0: the paper's theoretical peak)",
    )
    dep.add_argument(
        "--bandwidth-efficiency",
        type=float,
        default=1.0,
        help="achieved / peak bandwidth for HBM, interconnect and PCIe (default 1.0)",
    )
    dep.add_argument(
        "--hbm-utilization",
        type=float,
        default=1.0,
        help="fraction of HBM for weights + KV (default 1.0; vLLM uses 0.9)",
    )
    dep.add_argument(
        "--collective-latency-us",
        type=float,
        default=10.0,
        help="fixed latency of one collective or ring step, microseconds (default 10)",
    )
    dep.add_argument(
        "--attn-flops",
        default="paper",
        choices=ATTN_FLOPS_CONVENTIONS,
        help="paper: Kaplan's count (QK^T only), reproduces the paper; exact: QK^T and PV",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_simulate_arguments(parser)


def build_hardware(args: argparse.Namespace) -> Hardware:
    overrides: dict[str, float] = {}
    for flag, (name, scale) in {**_HW_OVERRIDES, **_OPTIONAL_HW}.items():
        if getattr(args, flag) is not None:
            overrides[name] = getattr(args, flag) * scale
    if args.hbm is not None:
        overrides["hbm_bytes"] = args.hbm
    if args.hardware == "custom":
        missing = [
            "--" + flag.replace("_", "-")
            for flag in [*_HW_OVERRIDES, "hbm"]
            if getattr(args, flag) is None
        ]
        if missing:
            raise ValueError(f"--hardware custom needs {', '.join(missing)}")
        return Hardware(name="custom", **overrides)
    base = get_hardware(args.hardware)
    if overrides:
        return dataclasses.replace(base, name=f"{base.name} (modified)", **overrides)
    return base


def layouts(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(tp, sp) of every --tp-size x --sp-size combination, only those making --num-gpus when
    given; a clear error when none does."""
    tps, sps = list(dict.fromkeys(args.tp_size)), list(dict.fromkeys(args.sp_size))
    for flag, values in (("--tp-size", tps), ("--sp-size", sps)):
        if min(values) < 1:
            raise ValueError(f"{flag} values must be >= 1, got {values}")
    combos = [(tp, sp) for tp in tps for sp in sps]
    if args.num_gpus is not None:
        if args.num_gpus < 1:
            raise ValueError(f"--num-gpus must be >= 1, got {args.num_gpus}")
        combos = [(tp, sp) for tp, sp in combos if tp * sp == args.num_gpus]
        if not combos:
            raise ValueError(
                f"no --tp-size {' '.join(map(str, tps))} x --sp-size {' '.join(map(str, sps))} "
                f"combination uses --num-gpus {args.num_gpus}: give pairs whose product is "
                f"{args.num_gpus}, e.g. -tp {args.num_gpus} -sp 1"
            )
    return combos


def model_path(args: argparse.Namespace) -> str | None:
    """The checkpoint the launch lines name: --model when it is a path (a config.json's
    directory), None for a preset."""
    if args.model is None or not Path(args.model).exists():
        return None
    path = Path(args.model)
    return str(path.parent if path.is_file() and path.name == "config.json" else path)


def build_deployment(args: argparse.Namespace, sp_size: int, tp_size: int = 1) -> Deployment:
    return Deployment(
        sp_size=sp_size,
        tp_size=tp_size,
        gpus_per_node=args.gpus_per_node,
        kv_dtype=args.kv_dtype,
        weight_dtype=args.weight_dtype,
        flops_efficiency=args.flops_efficiency,
        bandwidth_efficiency=args.bandwidth_efficiency,
        hbm_utilization=args.hbm_utilization,
        collective_latency_s=args.collective_latency_us * 1e-6,
        attn_flops=args.attn_flops,
    )


def build_plans(args: argparse.Namespace) -> list[PlanResult]:
    """One plan per layout (see layouts)."""
    shape, hw = resolve_model(args.model or DEFAULT_MODEL), build_hardware(args)
    return [
        plan(shape, hw, build_deployment(args, sp, tp), args.context_len, args.output_len,
             args.batch_size, model_path(args))
        for tp, sp in layouts(args)
    ]


def build_plan(args: argparse.Namespace) -> PlanResult:
    plans = build_plans(args)
    if len(plans) != 1:
        raise ValueError("give one --tp-size and one --sp-size for a single plan")
    return plans[0]


def _bytes(value: float) -> str:
    return f"{value / GB:,.3f} GB" if abs(value) >= 1e6 else f"{value:,.0f} B"


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def print_table(result: PlanResult) -> None:
    from rich.console import Console
    from rich.table import Table

    r, p, d = result, result.prefill, result.decode_first_step
    table = Table(
        title=f"{r.model} on {r.num_gpus} x {r.hardware} (tp={r.tp_size} x sp={r.sp_size}"
        f"{f', {r.num_nodes} nodes' if r.num_nodes > 1 else ''}), {r.context_len:,} context + "
        f"{r.output_len:,} output tokens, batch {r.batch_size}",
        title_justify="left",
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("how", style="dim")

    def section(name: str) -> None:
        table.add_row(f"[bold]{name}[/bold]", "", "", end_section=False)

    section("memory (concurrency)")
    table.add_row("parameters", f"{r.num_params / 1e9:.2f} B", "")
    table.add_row(
        "weights per rank", _bytes(r.weight_bytes_per_rank), "replicated over SP, sharded over TP"
    )
    table.add_row(
        "KV per token", _bytes(r.kv_bytes_per_token), "2 x layers x kv_heads x head_dim x bytes"
    )
    table.add_row("KV per request", _bytes(r.kv_bytes_per_request), "x context_len")
    table.add_row("KV heads per rank", f"{r.kv_heads_per_rank}", "max(1, kv_heads / tp)")
    table.add_row(
        "KV per request per rank", _bytes(r.kv_bytes_per_request_per_rank), "/ sp, rank's heads"
    )
    table.add_row(
        "[bold]memory per GPU[/bold]",
        f"[bold]{_bytes(r.memory_per_gpu_bytes)}[/bold]",
        f"weights + batch's KV; {'fits' if r.fits else 'DOES NOT FIT'} in "
        f"{_bytes(r.usable_hbm_bytes)}",
    )
    table.add_row(
        "free HBM per rank", _bytes(r.free_kv_bytes_per_rank), "HBM x utilisation - weights"
    )
    table.add_row("concurrent requests", f"{r.max_concurrency}", "per SP x TP group")
    table.add_row("longest request", f"{r.max_context_tokens:,} tokens", "grows with sp")
    for row in r.kv_dtypes:
        table.add_row(
            f"KV {row['kv_dtype']}: per token / max context",
            f"{_bytes(row['kv_bytes_per_token'])} / {row['max_context_per_gpu']:,}",
            f"per GPU; {row['max_context_tokens']:,} per SP x TP group"
            + (" (+ a bf16 scale per token and KV head)" if row["kv_dtype"] in ("fp8", "int8")
               else ""),
        )
    section("prefill (TTFT)")
    table.add_row("dense FLOPs", f"{p.dense_flops:.3e}", "2 x matmul params x tokens")
    table.add_row("attention FLOPs", f"{p.attention_flops:.3e}", "causal pairs, see assumptions")
    table.add_row("compute per rank", _time(p.compute_s), "FLOPs / (sp x tp) / FLOP/s")
    if r.sp_size > 1:
        verdict = "hidden" if p.ring_hidden else f"exposed {_time(p.ring_exposed_s)} total"
        table.add_row(
            "ring step: comm vs compute",
            f"{_time(p.ring_comm_step_s)} vs {_time(p.ring_compute_step_s)}",
            f"{verdict}; hides from {p.ring_min_tokens_per_rank:,.0f} tokens/rank",
        )
    if r.tp_size > 1:
        table.add_row("TP all-reduces", _time(p.tp_comm_s), "2 per layer")
    table.add_row("prefill time (TTFT)", f"[bold]{_time(p.total_s)}[/bold]", "")
    section("decode (TPOT)")
    table.add_row(
        "bytes read per rank per step",
        _bytes(d.weight_bytes_per_rank + d.kv_bytes_per_rank),
        f"weights {_bytes(d.weight_bytes_per_rank)} + KV {_bytes(d.kv_bytes_per_rank)}",
    )
    table.add_row(
        "memory vs compute", f"{_time(d.memory_s)} vs {_time(d.compute_s)}", "the larger counts"
    )
    if r.sp_size > 1:
        table.add_row("merge all-gather", _time(d.merge_comm_s), "(out, lse) per layer")
    if r.tp_size > 1:
        table.add_row("TP all-reduces", _time(d.tp_comm_s), "2 per layer")
    table.add_row(
        "decode step (TBT)", f"[bold]{_time(r.decode_step_s)}[/bold]", "mean over the output"
    )
    table.add_row(f"decode {r.output_len - 1} steps", _time(r.decode_total_s), "")
    table.add_row("end to end", _time(r.e2e_s), "prefill + decode")
    section("context switch (PCIe)")
    table.add_row(
        "KV to host, or back", _time(r.context_switch_s), "shard per rank, ranks in parallel"
    )
    table.add_row("round trip", _time(r.context_switch_round_trip_s), "")

    console = Console()
    console.print(table)
    print_launch(console, r)
    for warning in r.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print("[bold]assumptions[/bold]")
    for line in r.assumptions:
        console.print(f" - {line}", highlight=False)


def print_launch(console, r: PlanResult, heading: str = "launch") -> None:
    """The flags and the torchrun line that run the plan's layout, unwrapped (to copy)."""
    launch = r.launch
    nodes = f"{launch['num_nodes']} nodes x {launch['nproc_per_node']} GPUs" \
        if launch["num_nodes"] > 1 else "1 node"
    console.print(
        f"[bold]{heading}[/bold]: world {launch['world_size']} = TP {launch['tp_size']} x SP "
        f"{launch['sp_size']} ({nodes}); sp-serve serve {launch['flags']}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"  {launch['command']}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"  or: {launch['recipe']}", highlight=False, markup=False, soft_wrap=True)
    for note in launch["notes"]:
        console.print(f"  ({note})", highlight=False, markup=False)


def print_comparison(results: list[PlanResult]) -> None:
    """Several layouts of one model, hardware and workload, a column each."""
    from rich.console import Console
    from rich.table import Table

    first = results[0]
    table = Table(
        title=f"{first.model} on {first.hardware}, {first.context_len:,} context + "
        f"{first.output_len:,} output tokens, batch {first.batch_size}: layouts compared",
        title_justify="left",
    )
    table.add_column("quantity")
    for r in results:
        table.add_column(f"TP {r.tp_size} x SP {r.sp_size}", justify="right")

    def row(name: str, fn) -> None:
        table.add_row(name, *(fn(r) for r in results))

    row("GPUs (nodes)", lambda r: f"{r.num_gpus} ({r.num_nodes})")
    row("KV heads per rank", lambda r: f"{r.kv_heads_per_rank}")
    row("weights per GPU", lambda r: _bytes(r.weight_bytes_per_rank))
    row("KV per GPU", lambda r: _bytes(r.kv_bytes_per_request_per_rank * r.batch_size))
    row("[bold]memory per GPU[/bold]", lambda r: f"[bold]{_bytes(r.memory_per_gpu_bytes)}[/bold]")
    row("fits (usable HBM)",
        lambda r: f"{'yes' if r.fits else 'NO'} ({_bytes(r.usable_hbm_bytes)})")
    row("concurrent requests", lambda r: f"{r.max_concurrency}")
    row("longest request", lambda r: f"{r.max_context_tokens:,}")
    row("prefill compute", lambda r: _time(r.prefill.compute_s))
    row("prefill ring exposed", lambda r: _time(r.prefill.ring_exposed_s))
    row("prefill TP all-reduces", lambda r: _time(r.prefill.tp_comm_s))
    row("[bold]TTFT[/bold]", lambda r: f"[bold]{_time(r.ttft_s)}[/bold]")
    row("decode HBM read", lambda r: _time(r.decode_first_step.memory_s))
    row("decode SP merge", lambda r: _time(r.decode_first_step.merge_comm_s))
    row("decode TP all-reduces", lambda r: _time(r.decode_first_step.tp_comm_s))
    row("[bold]TBT (decode step)[/bold]", lambda r: f"[bold]{_time(r.decode_step_s)}[/bold]")
    row("end to end", lambda r: _time(r.e2e_s))
    console = Console()
    console.print(table)
    for r in results:
        print_launch(console, r, f"TP {r.tp_size} x SP {r.sp_size}")
        for warning in r.warnings:
            console.print(f"  [yellow]warning:[/yellow] {warning}")
    console.print("[bold]assumptions[/bold]")
    for line in dict.fromkeys(line for r in results for line in r.assumptions):
        console.print(f" - {line}", highlight=False)


def run(args: argparse.Namespace) -> int:
    if args.simulate:
        return run_simulation(args)
    try:
        results = build_plans(args)
    except ValueError as exc:
        print(f"sp-serve plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = results[0].to_dict() if len(results) == 1 else {
            "plans": [r.to_dict() for r in results]}
        print(json.dumps(out, indent=2))
    elif len(results) == 1:
        print_table(results[0])
    else:
        print_comparison(results)
    return 0


# --- --simulate ----------------------------------------------------------------------------------


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    sim = parser.add_argument_group(
        "simulation (--simulate): the engine's own scheduler and block manager on a workload, "
        "step times from the analytic model above or from a calibrated --cost-model"
    )
    sim.add_argument(
        "--simulate",
        action="store_true",
        help="simulate serving a workload instead of one request; the TP, SP, scheduler and SLO "
        "flags may then take several values, one simulation per combination",
    )
    sim.add_argument(
        "--trace",
        default=None,
        help='workload file: JSONL lines {"arrival_time": s, "prompt_len": n, "output_len": m}, '
        "or a `sp-serve bench serve` result JSON (its measured requests)",
    )
    sim.add_argument(
        "--dataset-name",
        default="random",
        choices=["random", "long-doc", "prefix-repetition"],
        help="generated workload when no --trace: random (--context-len tokens), long-doc "
        "(--long-fraction of --long-input-len, the rest --short-input-len) or prefix-repetition "
        "(N documents x M questions, bench serve's flags)",
    )
    sim.add_argument("--num-prompts", type=int, default=100)
    sim.add_argument(
        "--request-rate", type=float, default=1.0, help="req/s, Poisson; inf: all at once (1.0)"
    )
    sim.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1.0 = Poisson")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--random-range-ratio", type=float, default=0.0)
    sim.add_argument("--long-fraction", type=float, default=0.1)
    sim.add_argument(
        "--long-input-len", type=int, default=None, help="long-doc (default: --context-len)"
    )
    sim.add_argument("--short-input-len", type=int, default=512)
    sim.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    sim.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    sim.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    sim.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                     help="simulate the engine's prefix caching (on, as the engine's default) for "
                     "requests that share a prefix (prefix-repetition, traces with prefix_id)")
    sim.add_argument("--save-trace", default=None, help="write the workload as a JSONL trace")
    sim.add_argument(
        "--cost-model",
        default=None,
        help="a CostModel JSON saved from a real engine (its start-up calibration): step times "
        "from it instead of the analytic model. It holds for the SP degree it was measured at",
    )
    sim.add_argument(
        "--step-log",
        default=None,
        nargs="+",
        metavar="FILE",
        help="one or more server step logs (`sp-serve serve --step-log FILE`): step times and "
        "their noise fitted on real traffic (several runs average out a shared machine's "
        "run-to-run drift). The scheduler still decides with --cost-model when given (what "
        "that server was started with)",
    )
    sim.add_argument("--scheduler", nargs="+", default=["slo"], choices=["slo", "fcfs"])
    sim.add_argument("--ttft-slo-ms", type=float, nargs="+", default=[2000.0])
    sim.add_argument("--tbt-slo-ms", type=float, nargs="+", default=[200.0])
    sim.add_argument("--max-num-seqs", type=int, default=64)
    sim.add_argument("--max-num-batched-tokens", type=int, default=8192)
    sim.add_argument("--block-size", type=int, default=16)
    sim.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=None,
        help="KV pool bytes per rank (default: HBM left after the weights; with --cost-model, "
        "4GiB as the CPU engine)",
    )
    sim.add_argument(
        "--num-kv-blocks", type=int, default=None, help="KV blocks per rank (overrides the above)"
    )
    sim.add_argument(
        "--kv-offloading-size", "--swap-space", dest="kv_offloading_size", type=float, default=0.0,
        metavar="GiB", help="host KV pool per rank in GiB, for preemption by swap (default 0)"
    )
    sim.add_argument(
        "--preemption-mode", default=None, choices=["swap", "recompute"],
        help="as the engine's (default: swap with --kv-offloading-size, else recompute)"
    )
    sim.add_argument(
        "--swap-bandwidth-gbs", type=float, default=None,
        help="device <-> host copy rate per rank for swaps (default: the hardware's PCIe x "
        "--bandwidth-efficiency; give this machine's for a --cost-model run on CPU)"
    )
    sim.add_argument(
        "--step-overhead-ms",
        type=float,
        default=0.0,
        help="added to every step (sampling, Python, HTTP streaming; default 0)",
    )
    sim.add_argument(
        "--request-overhead-ms",
        type=float,
        default=0.0,
        help="per request, outside the engine's steps (HTTP, tokenization, SSE): a serving "
        "run's median TTFT beyond the simulated one (default 0)",
    )
    sim.add_argument(
        "--step-time-sigma",
        type=float,
        default=None,
        help="log-normal noise on every step's time (a shared CPU: ~0.1-0.3; default: the "
        "--step-log's, else 0)",
    )
    sim.add_argument(
        "--step-time-sigma-at-ms",
        type=float,
        default=None,
        help="the step length --step-time-sigma holds for; a step of t ms gets sigma * "
        "sqrt(this / t), so long steps average the noise out (default: the --step-log's when "
        "its sigma is used, else 0: every step gets --step-time-sigma)",
    )
    sim.add_argument(
        "--goodput", nargs="+", default=None, metavar="KEY:MS", help="e.g. ttft:2000 tpot:100"
    )
    sim.add_argument("--metric-percentiles", default="50,90,99")


def build_workload(args: argparse.Namespace):
    from sp_serve.planner.simulator import generate_trace, load_trace

    if args.trace is not None:
        return load_trace(args.trace), {"source": "trace", "path": args.trace}
    trace = generate_trace(
        dataset=args.dataset_name,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        seed=args.seed,
        input_len=args.context_len,
        output_len=args.output_len,
        range_ratio=args.random_range_ratio,
        long_fraction=args.long_fraction,
        long_input_len=args.long_input_len or args.context_len,
        short_input_len=args.short_input_len,
        prefix_len=args.prefix_repetition_prefix_len,
        suffix_len=args.prefix_repetition_suffix_len,
        num_prefixes=args.prefix_repetition_num_prefixes,
    )
    source = {
        "source": args.dataset_name,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "burstiness": args.burstiness,
        "seed": args.seed,
    }
    return trace, source


def _kv_blocks(args: argparse.Namespace, dep: Deployment) -> int:
    from sp_serve.planner.simulator import analytic_kv_blocks

    if args.num_kv_blocks is not None:
        return args.num_kv_blocks
    if args.cost_model is None and args.step_log is None:
        return analytic_kv_blocks(
            resolve_model(args.model or DEFAULT_MODEL),
            build_hardware(args),
            dep,
            args.block_size,
            args.kv_cache_memory,
        )
    if args.model is None:
        raise ValueError(
            "with --cost-model or --step-log, give --model (the checkpoint it was calibrated on, and "
            "--kv-dtype fp32 for a float32 one) or --num-kv-blocks, to size the KV pool"
        )
    from sp_serve.engine.runtime import DEFAULT_CPU_KV_BYTES

    budget = args.kv_cache_memory or DEFAULT_CPU_KV_BYTES
    return analytic_kv_blocks(resolve_model(args.model), build_hardware(args), dep,
                              args.block_size, budget)


def _swap_config(args: argparse.Namespace, dep: Deployment) -> dict:
    """SimConfig's host pool (blocks per rank) and the seconds a rank copies one block in."""
    from sp_serve.planner.analytic import kv_bytes_per_token_per_rank

    if args.kv_offloading_size < 0:
        raise ValueError(f"--kv-offloading-size must be >= 0 GiB, got {args.kv_offloading_size}")
    mode = args.preemption_mode or ("swap" if args.kv_offloading_size else "recompute")
    if not args.kv_offloading_size:
        return {"preemption_mode": mode}
    shape = resolve_model(args.model or DEFAULT_MODEL)
    block_bytes = kv_bytes_per_token_per_rank(shape, dep) * dep.sp_size * args.block_size
    if args.swap_bandwidth_gbs is not None:
        bandwidth = args.swap_bandwidth_gbs * GB
    else:
        bandwidth = build_hardware(args).pcie_bandwidth * dep.bandwidth_efficiency
    return {"num_host_blocks": int(args.kv_offloading_size * 2**30 // block_bytes),
            "preemption_mode": mode, "swap_s_per_block": block_bytes / bandwidth}


def build_simulations(args: argparse.Namespace):
    """[(SimConfig, StepCost)] for every layout (--tp-size x --sp-size, see layouts),
    --scheduler and SLOs."""
    import itertools

    from sp_serve.engine.cost_model import CostModel
    from sp_serve.planner.simulator import (
        AnalyticStepCost,
        CalibratedStepCost,
        SimConfig,
        fit_step_log,
        step_sigma,
    )

    calibrated = fitted = None
    if args.cost_model is not None:
        try:
            calibrated = CostModel.load(args.cost_model)
        except (OSError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read --cost-model {args.cost_model}: {exc}") from None
    if args.step_log is not None:
        fitted = fit_step_log(args.step_log)
    grid = layouts(args)
    if (calibrated or fitted) is not None and len(grid) > 1:
        print(
            "sp-serve plan: warning: a calibrated --cost-model or --step-log holds for the TP x SP "
            "layout it was measured at; across --tp-size / --sp-size only the KV capacity changes",
            file=sys.stderr,
        )
    sigma, sigma_at_ms = args.step_time_sigma, args.step_time_sigma_at_ms
    if sigma is None and fitted is not None:
        if sigma_at_ms is None:  # as fitted
            sigma, sigma_at_ms = fitted.sigma, 1e3 * fitted.sigma_at_s
        elif sigma_at_ms > 0:  # the fitted noise, restated for a step of that length
            sigma = step_sigma(fitted.sigma, fitted.sigma_at_s, sigma_at_ms / 1e3)
        else:  # one sigma for every step: the fitted one at the logged steps' median length
            sigma = fitted.sigma
    elif sigma is None and sigma_at_ms is not None:
        raise ValueError("--step-time-sigma-at-ms says which step length --step-time-sigma "
                         "holds for: give --step-time-sigma too (or a --step-log to fit it on)")
    runs = []
    for (tp, sp), scheduler, ttft, tbt in itertools.product(
        grid, args.scheduler, args.ttft_slo_ms, args.tbt_slo_ms
    ):
        dep = build_deployment(args, sp, tp)
        if fitted is not None:
            speeds = "" if len(fitted.run_speed) < 2 else (
                "; each log's speed vs the fit: " + ", ".join(
                    f"{Path(p).name} {x:.2f}" for p, x in zip(args.step_log, fitted.run_speed)))
            cost = fitted.step_cost(
                f"fitted on {fitted.num_steps} logged steps: {', '.join(args.step_log)}{speeds}",
                scheduler_model=calibrated)
        elif calibrated is not None:
            cost = CalibratedStepCost(calibrated, f"calibrated: {args.cost_model}")
        else:
            cost = AnalyticStepCost(
                resolve_model(args.model or DEFAULT_MODEL), build_hardware(args), dep
            )
        config = SimConfig(
            sp_size=sp,
            tp_size=tp,
            scheduler=scheduler,
            ttft_slo_s=ttft / 1e3,
            tbt_slo_s=tbt / 1e3,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            num_kv_blocks=_kv_blocks(args, dep),
            step_overhead_s=args.step_overhead_ms / 1e3,
            request_overhead_s=args.request_overhead_ms / 1e3,
            step_time_sigma=sigma or 0.0,
            step_time_sigma_at_s=(sigma_at_ms or 0.0) / 1e3,
            seed=args.seed,
            enable_prefix_caching=args.enable_prefix_caching,
            **_swap_config(args, dep),
        )
        runs.append((config, cost))
    return runs


def simulate_from_args(args: argparse.Namespace) -> dict:
    """Everything `plan --simulate --json` prints."""
    from sp_serve.bench.metrics import parse_goodput, parse_percentiles
    from sp_serve.planner.simulator import save_trace, simulate

    percentiles = parse_percentiles(args.metric_percentiles)
    goodput = parse_goodput(args.goodput)
    trace, source = build_workload(args)
    if args.save_trace:
        save_trace(trace, args.save_trace)
    runs = []
    for config, cost in build_simulations(args):
        runs.append(simulate(trace, config, cost).summary(percentiles, goodput))
    prompt_lens = [r.prompt_len for r in trace]
    workload = {
        **source,
        "num_requests": len(trace),
        "total_prompt_tokens": sum(prompt_lens),
        "max_prompt_len": max(prompt_lens),
        "mean_prompt_len": sum(prompt_lens) / len(trace),
        "total_output_tokens": sum(r.output_len for r in trace),
        "last_arrival_s": max(r.arrival_time for r in trace),
    }
    return {
        "model": args.model or DEFAULT_MODEL,
        "hardware": None if args.cost_model or args.step_log else build_hardware(args).name,
        "cost_model": args.cost_model,
        "step_log": args.step_log,
        "percentiles": percentiles,
        "workload": workload,
        "runs": runs,
    }


def _ms(value: float) -> str:
    return _time(value / 1e3)


def _layout(run: dict) -> str:
    tp = run.get("tp_size", 1)
    return f"tp={tp} sp={run['sp_size']}" if tp != 1 else f"sp={run['sp_size']}"


def print_simulation(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from sp_serve.bench.metrics import percentile_key

    w, runs = out["workload"], out["runs"]
    where = (", ".join(out["step_log"] or []) or out["cost_model"]
             or f"{out['model']} on {out['hardware']}")
    table = Table(
        title=f"simulated serving: {where}; {w['num_requests']} requests ({w['source']}), "
        f"prompts {w['mean_prompt_len']:,.0f} mean / {w['max_prompt_len']:,} max tokens",
        title_justify="left",
    )
    table.add_column("quantity")
    for r in runs:
        table.add_column(
            f"{_layout(r)} {r['scheduler']}\nSLO {r['ttft_slo_ms']:g}/{r['tbt_slo_ms']:g} ms",
            justify="right",
        )

    def row(name: str, fn) -> None:
        table.add_row(name, *(fn(r) for r in runs))

    keys = [percentile_key(p) for p in out["percentiles"]]
    row("completed / rejected", lambda r: f"{r['metrics']['completed']} / {r['rejected']}")
    row("duration", lambda r: _time(r["duration_s"]))
    for metric, name in (("ttft", "TTFT"), ("itl", "TBT (ITL)"), ("tpot", "TPOT"),
                         ("e2el", "E2E")):
        for key in keys:
            row(f"{name} {key}", lambda r, k=f"{key}_{metric}_ms": _ms(r["metrics"][k]))
    if any("median_short_ttft_ms" in r["metrics"] for r in runs):
        for kind in ("short", "long"):
            for key in ("median", keys[-1]):
                row(
                    f"TTFT {kind} {key}",
                    lambda r, k=f"{key}_{kind}_ttft_ms": _ms(r["metrics"].get(k, 0.0)),
                )
    if runs[0]["goodput_slos_ms"]:
        slos = " ".join(f"{k}:{v:g}" for k, v in runs[0]["goodput_slos_ms"].items())
        row(f"goodput ({slos} ms)", lambda r: f"{r['metrics']['request_goodput']:.3f} req/s "
            f"({100 * r['goodput_fraction']:.0f}%)")
    row("output throughput", lambda r: f"{r['metrics']['output_throughput']:,.1f} tok/s")
    row("steps (prefill/decode/mixed)", lambda r: "/".join(
        str(r["steps"][k]["count"]) for k in ("prefill", "decode", "mixed")))
    for kind in ("prefill", "decode", "mixed"):
        if any(r["steps"][kind]["count"] for r in runs):
            row(f"{kind} step mean / max", lambda r, k=kind: (
                f"{_ms(r['steps'][k]['mean_step_ms'])} / {_ms(r['steps'][k]['max_step_ms'])}"
                if r["steps"][k]["count"] else "-"))
    row("busy fraction", lambda r: f"{100 * r['steps']['busy_fraction']:.0f}%")
    row("preemptions (swapped)", lambda r: f"{r['num_preemptions']} "
        f"({r.get('num_swapped_out', 0)})")
    row("KV blocks per rank / peak use", lambda r: f"{r['kv_blocks_per_rank']:,} / "
        f"{100 * r['peak_kv_usage']:.0f}%")
    console = Console()
    console.print(table)
    for r in runs:
        for reason in r["rejection_reasons"]:
            console.print(f"[yellow]{_layout(r)}: rejected:[/yellow] {reason}")
    errors = {r["step_cost"]: r["scheduler_cost_fit_max_rel_error"] for r in runs}
    for description, error in errors.items():
        note = "" if error is None else (
            f"; the scheduler's CostModel fits it within {100 * error:.0f}% (max over the grid)")
        console.print(f"step times: {description}{note}", highlight=False)


def run_simulation(args: argparse.Namespace) -> int:
    try:
        out = simulate_from_args(args)
    except ValueError as exc:
        print(f"sp-serve plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_simulation(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point until the lead wires `sp-serve plan`."""
    parser = argparse.ArgumentParser(prog="sp-serve plan", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
