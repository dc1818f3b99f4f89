"""`sp-serve plan`: the analytic model of sp_serve.planner.analytic as a table or JSON.

With no flags it prints the paper's running example: Yi-34B-200K, 50K context, one A100-80GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

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

# CLI flag -> Hardware field and the factor from the flag's unit to the field's unit.
_HW_OVERRIDES = {
    "peak_tflops": ("peak_flops", 1e12),
    "hbm_bw_gbs": ("hbm_bandwidth", 1e9),
    "interconnect_bw_gbs": ("interconnect_bandwidth", 1e9),
    "pcie_bw_gbs": ("pcie_bandwidth", 1e9),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="yi-34b-200k",
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

    dep = parser.add_argument_group("deployment")
    dep.add_argument("--sp-size", "--sequence-parallel-size", "-sp", type=int, default=1)
    dep.add_argument("--tp-size", "--tensor-parallel-size", "-tp", type=int, default=1)
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


def build_hardware(args: argparse.Namespace) -> Hardware:
    overrides: dict[str, float] = {}
    for flag, (name, scale) in _HW_OVERRIDES.items():
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


def build_plan(args: argparse.Namespace) -> PlanResult:
    dep = Deployment(
        sp_size=args.sp_size,
        tp_size=args.tp_size,
        kv_dtype=args.kv_dtype,
        weight_dtype=args.weight_dtype,
        flops_efficiency=args.flops_efficiency,
        bandwidth_efficiency=args.bandwidth_efficiency,
        hbm_utilization=args.hbm_utilization,
        collective_latency_s=args.collective_latency_us * 1e-6,
        attn_flops=args.attn_flops,
    )
    return plan(
        resolve_model(args.model),
        build_hardware(args),
        dep,
        args.context_len,
        args.output_len,
        args.batch_size,
    )


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
        title=f"{r.model} on {r.num_gpus} x {r.hardware} (sp={r.sp_size}, tp={r.tp_size}), "
        f"{r.context_len:,} context + {r.output_len:,} output tokens, batch {r.batch_size}",
        title_justify="left",
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("how", style="dim")

    def section(name: str) -> None:
        table.add_row(f"[bold]{name}[/bold]", "", "", end_section=False)

    section("memory (concurrency)")
    table.add_row("parameters", f"{r.num_params / 1e9:.2f} B", "")
    table.add_row("weights per rank", _bytes(r.weight_bytes_per_rank), "replicated over SP, 1/tp")
    table.add_row(
        "KV per token", _bytes(r.kv_bytes_per_token), "2 x layers x kv_heads x head_dim x bytes"
    )
    table.add_row("KV per request", _bytes(r.kv_bytes_per_request), "x context_len")
    table.add_row("KV per request per rank", _bytes(r.kv_bytes_per_request_per_rank), "/ (sp x tp)")
    table.add_row(
        "free HBM per rank", _bytes(r.free_kv_bytes_per_rank), "HBM x utilisation - weights"
    )
    table.add_row("concurrent requests", f"{r.max_concurrency}", "per SP x TP group")
    table.add_row("longest request", f"{r.max_context_tokens:,} tokens", "grows with sp")
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
    table.add_row("prefill time", f"[bold]{_time(p.total_s)}[/bold]", "")
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
    table.add_row("decode step", f"[bold]{_time(r.decode_step_s)}[/bold]", "mean over the output")
    table.add_row(f"decode {r.output_len - 1} steps", _time(r.decode_total_s), "")
    table.add_row("end to end", _time(r.e2e_s), "prefill + decode")
    section("context switch (PCIe)")
    table.add_row(
        "KV to host, or back", _time(r.context_switch_s), "shard per rank, ranks in parallel"
    )
    table.add_row("round trip", _time(r.context_switch_round_trip_s), "")

    console = Console()
    console.print(table)
    for warning in r.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print("[bold]assumptions[/bold]")
    for line in r.assumptions:
        console.print(f" - {line}", highlight=False)


def run(args: argparse.Namespace) -> int:
    try:
        result = build_plan(args)
    except ValueError as exc:
        print(f"sp-serve plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point until the lead wires `sp-serve plan`."""
    parser = argparse.ArgumentParser(prog="sp-serve plan", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
