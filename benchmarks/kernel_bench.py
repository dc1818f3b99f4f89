"""Benchmark of the Triton kernels (sp_serve_kernels) on a CUDA GPU, against measured ceilings.

    python benchmarks/kernel_bench.py --check --json kernels.json

Prints one table per kernel family:
  * ceilings measured in the same run: bf16 matmul TFLOP/s (torch.matmul 8192^3) and
    device-to-device copy GB/s (1 GiB tensor copy, read + write bytes);
  * causal prefill attention, bf16, head_dim 128, one sequence of 4K..64K tokens: TFLOP/s of
    prefill_attention and of torch SDPA's flash backend on the same inputs;
  * paged decode attention, context 4K..128K x batch 1..64: achieved GB/s (KV read once + q +
    out) next to the copy bandwidth.
Times are triton.testing.do_bench medians (it clears L2 between runs) on fresh random inputs.
--check first verifies every kernel against the float64 torch reference on the GPU and stops
on a mismatch. See benchmarks/NOTES.md for the method.

Shape legend: t tokens, h heads, d head_dim, b batch.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections.abc import Callable

import torch

GiB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="verify the kernels against the torch reference before timing")
    parser.add_argument("--check-only", action="store_true", help="verify, then exit")
    parser.add_argument("--json", metavar="PATH", help="also write all results as JSON here")
    parser.add_argument("--prefill-tokens", type=int, nargs="*",
                        default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--decode-contexts", type=int, nargs="*",
                        default=[4096, 16384, 65536, 131072])
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8, 32, 64])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-splits", type=int, default=None,
                        help="decode KV splits (default: the kernel's heuristic)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time a few prefill launch configs and report the best")
    parser.add_argument("--max-cache-gib", type=float, default=None,
                        help="skip decode cases whose KV exceeds this (default: 60%% of free)")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench time per case")
    return parser.parse_args(argv)


def bench_ms(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms,
                                         return_mode="median"))


# ---------------------------------------------------------------- ceilings


def _matmul_tflops(rep_ms: int) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (bench_ms(lambda: torch.matmul(a, b), rep_ms) * 1e-3) / 1e12


def _copy_gbps(rep_ms: int) -> float:
    src = torch.randn(GiB // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    # bytes read + bytes written
    return 2 * GiB / (bench_ms(lambda: dst.copy_(src), rep_ms) * 1e-3) / 1e9


def measure_ceilings(rep_ms: int) -> dict[str, float]:
    return {"matmul_bf16_tflops": _matmul_tflops(rep_ms), "copy_gbps": _copy_gbps(rep_ms)}


# ---------------------------------------------------------------- correctness on the GPU


def run_checks() -> list[dict[str, object]]:
    """Each kernel vs its float64 reference on the GPU; small but production-shaped cases."""
    import sp_serve_kernels as K

    gen = torch.Generator(device="cuda").manual_seed(1234)
    results: list[dict[str, object]] = []

    def record(name: str, out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor,
               ref_lse: torch.Tensor, tol: float) -> None:
        finite = torch.isfinite(ref_lse)
        ok = (not out.isnan().any().item() and not lse.isnan().any().item()
              and torch.equal(torch.isfinite(lse), finite)
              and torch.allclose(out.double(), ref_out, rtol=tol, atol=tol)
              and torch.allclose(lse.double()[finite], ref_lse[finite], rtol=1e-4, atol=1e-3))
        err = (out.double() - ref_out).abs().max().item() if out.numel() else 0.0
        results.append({"check": name, "ok": bool(ok), "max_abs_err": err})
        print(f"  {'ok  ' if ok else 'FAIL'} {name:58s} max |err| {err:.2e}")

    def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 5e-3), (torch.float32, 1e-4)):
        for head_dim in (64, 128):
            for causal in (True, False):
                q_lens, k_lens = [1, 300, 0, 777, 64], [1, 300, 5, 1000, 0]
                hq, hkv = 8, 2
                cu_q = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
                cu_k = torch.tensor([0] + k_lens, device="cuda").cumsum(0).int()
                q = randn(sum(q_lens), hq, head_dim, dtype=dtype)
                k = randn(sum(k_lens), hkv, head_dim, dtype=dtype)
                v = randn(sum(k_lens), hkv, head_dim, dtype=dtype)
                out = torch.full_like(q, float("nan"))
                lse = torch.full((hq, q.shape[0]), float("nan"), device="cuda")
                K.prefill_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), causal,
                                    head_dim**-0.5, out=out, lse_out=lse)
                ref = K.prefill_attention_ref(q, k, v, cu_q, cu_k, causal, head_dim**-0.5)
                record(f"prefill {str(dtype)[6:]} d{head_dim} {'causal' if causal else 'full'}",
                       out, lse, *ref, tol)
        for group, splits in ((1, 1), (4, None), (8, 7)):
            ctx = [0, 1, 1000, 4099]
            hkv, head_dim, page = 4, 128, 16
            pages_per_seq = math.ceil(max(ctx) / page) + 1
            num_pages = len(ctx) * pages_per_seq
            k_cache = randn(num_pages, page, hkv, head_dim, dtype=dtype)
            v_cache = randn(num_pages, page, hkv, head_dim, dtype=dtype)
            tables = torch.randperm(num_pages, device="cuda").view(len(ctx), -1).int()
            lens = torch.tensor(ctx, device="cuda", dtype=torch.int32)
            q = randn(len(ctx), hkv * group, head_dim, dtype=dtype)
            out = torch.full_like(q, float("nan"))
            lse = torch.full(q.shape[:2], float("nan"), device="cuda")
            K.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5, splits,
                                     out=out, lse_out=lse)
            ref = K.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
            record(f"decode {str(dtype)[6:]} group {group} splits {splits}", out, lse, *ref, tol)
    o = randn(4, 100, 32, 128, dtype=torch.float32)
    lse_in = randn(4, 32, 100, dtype=torch.float32)
    lse_in[1] = float("-inf")
    lse_in[:, :, 7] = float("-inf")
    out, lse = K.merge_attention_partials(o, lse_in)
    record("merge fp32 4 partials", out, lse, *K.merge_attention_partials_ref(o, lse_in), 1e-4)
    return results


# ---------------------------------------------------------------- prefill


PREFILL_SWEEP = [  # (block_m, block_n, num_warps, num_stages)
    (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4),
    (64, 128, 4, 2),
]


def _time_prefill(args: argparse.Namespace, tokens: int) -> dict[str, object]:
    """Ours (and a config sweep if asked) vs SDPA flash, one causal sequence of `tokens`."""
    import sp_serve_kernels as K
    import torch.nn.functional as F
    from sp_serve_kernels.prefill_attention import PrefillConfig, default_prefill_config
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.runtime.errors import OutOfResources

    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    flops = 4 * tokens * tokens / 2 * hq * d
    q_thd = torch.randn(tokens, hq, d, device="cuda", dtype=torch.bfloat16)
    k_thd = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
    v_thd = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
    out, lse = torch.empty_like(q_thd), torch.empty(hq, tokens, device="cuda")

    def ours(config: PrefillConfig | None = None) -> object:
        return K.prefill_attention(q_thd, k_thd, v_thd, cu, cu, tokens, tokens, True, scale,
                                   out=out, lse_out=lse, config=config)

    ours_ms = bench_ms(ours, args.rep_ms)
    best_config = default_prefill_config(d, torch.bfloat16)
    if args.sweep:
        for shape in PREFILL_SWEEP:
            config = PrefillConfig(*shape)
            try:
                ms = bench_ms(lambda config=config: ours(config), args.rep_ms)
            except OutOfResources as error:  # a config may not fit shared memory
                print(f"    {config}: {error}")
                continue
            print(f"    {config}: {flops / ms / 1e9:.0f} TF/s")
            if ms < ours_ms:
                ours_ms, best_config = ms, config

    # SDPA wants [B, H, T, D]; its flash backend takes GQA directly where supported.
    q_bhtd = q_thd.transpose(0, 1)[None].contiguous()
    k_bhtd = k_thd.transpose(0, 1)[None].contiguous()
    v_bhtd = v_thd.transpose(0, 1)[None].contiguous()
    gqa, sdpa_note = True, "enable_gqa"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, is_causal=True, scale=scale,
                                           enable_gqa=True)
    except RuntimeError:  # flash backends without GQA: repeat kv heads outside the timing
        gqa, sdpa_note = False, "kv heads repeated before timing"
        k_bhtd = k_bhtd.repeat_interleave(hq // hkv, dim=1)
        v_bhtd = v_bhtd.repeat_interleave(hq // hkv, dim=1)

    def sdpa() -> object:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, is_causal=True,
                                                  scale=scale, enable_gqa=gqa)

    sdpa_ms = bench_ms(sdpa, args.rep_ms)
    return {"tokens": tokens, "ours_ms": ours_ms, "ours_tflops": flops / ours_ms / 1e9,
            "sdpa_flash_ms": sdpa_ms, "sdpa_flash_tflops": flops / sdpa_ms / 1e9,
            "sdpa_note": sdpa_note, "config": best_config.__dict__}


def bench_prefill(args: argparse.Namespace, ceilings: dict[str, float]) -> list[dict[str, object]]:
    print(f"\ncausal prefill attention, bf16, Hq {args.q_heads} Hkv {args.kv_heads} head_dim "
          f"{args.head_dim}, one sequence (FLOPs = 4 * T^2/2 * Hq * D)")
    print(f"{'tokens':>8} {'ours ms':>9} {'ours TF/s':>10} {'sdpa ms':>9} {'sdpa TF/s':>10} "
          f"{'ours/sdpa':>9} {'ours/matmul':>11}")
    rows = []
    for tokens in args.prefill_tokens:
        row = _time_prefill(args, tokens)
        torch.cuda.empty_cache()
        ours_tf, sdpa_tf = row["ours_tflops"], row["sdpa_flash_tflops"]
        print(f"{tokens:>8} {row['ours_ms']:>9.3f} {ours_tf:>10.1f} {row['sdpa_flash_ms']:>9.3f} "
              f"{sdpa_tf:>10.1f} {ours_tf / sdpa_tf:>9.2f} "
              f"{ours_tf / ceilings['matmul_bf16_tflops']:>11.2f}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- decode


def _time_decode(args: argparse.Namespace, context: int, batch: int) -> dict[str, object]:
    """One decode step of `batch` sequences of `context` keys, pages placed at random."""
    import sp_serve_kernels as K
    from sp_serve_kernels.decode_attention import default_num_splits

    hq, hkv, d, page = args.q_heads, args.kv_heads, args.head_dim, args.page_size
    pages_per_seq = math.ceil(context / page)
    num_pages = batch * pages_per_seq
    k_cache = torch.randn(num_pages, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(num_pages, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(num_pages, device="cuda").view(batch, -1).int()
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q_bhd = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    out, lse = torch.empty_like(q_bhd), torch.empty(batch, hq, device="cuda")
    splits = args.num_splits or default_num_splits(batch, hkv, pages_per_seq * page,
                                                   q_bhd.device)
    ms = bench_ms(lambda: K.paged_decode_attention(q_bhd, k_cache, v_cache, tables, lens,
                                                   d**-0.5, splits, out=out, lse_out=lse),
                  args.rep_ms)
    moved = 2 * batch * context * hkv * d * 2 + 2 * q_bhd.numel() * q_bhd.element_size()
    return {"context": context, "batch": batch, "num_splits": splits, "ms": ms, "bytes": moved,
            "gbps": moved / (ms * 1e-3) / 1e9}


def bench_decode(args: argparse.Namespace, ceilings: dict[str, float]) -> list[dict[str, object]]:
    hkv, d = args.kv_heads, args.head_dim
    free_bytes, _ = torch.cuda.mem_get_info()
    budget = (args.max_cache_gib * GiB) if args.max_cache_gib else 0.6 * free_bytes
    print(f"\npaged decode attention, bf16, Hq {args.q_heads} Hkv {hkv} head_dim {d}, page "
          f"{args.page_size}, random page placement (bytes = KV read once + q + out)")
    print(f"{'context':>8} {'batch':>6} {'splits':>6} {'ms':>9} {'GB/s':>8} {'of copy':>8}")
    rows = []
    for context in args.decode_contexts:
        for batch in args.decode_batches:
            kv_bytes = 2 * batch * context * hkv * d * 2
            if kv_bytes > budget:
                print(f"{context:>8} {batch:>6}   skipped: KV {kv_bytes / GiB:.1f} GiB > budget")
                continue
            row = _time_decode(args, context, batch)
            torch.cuda.empty_cache()
            print(f"{context:>8} {batch:>6} {row['num_splits']:>6} {row['ms']:>9.3f} "
                  f"{row['gbps']:>8.0f} {row['gbps'] / ceilings['copy_gbps']:>8.2f}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py needs a CUDA GPU (tests/test_kernels.py covers the CPU "
              "interpreter)", file=sys.stderr)
        return 2
    import triton

    device = torch.cuda.get_device_name()
    print(f"device: {device}  torch {torch.__version__}  triton {triton.__version__}  "
          f"python {platform.python_version()}")
    report: dict[str, object] = {"device": device, "torch": torch.__version__,
                                 "triton": triton.__version__, "args": vars(args)}
    if args.check or args.check_only:
        print("\ncorrectness vs float64 torch reference:")
        checks = run_checks()
        report["checks"] = checks
        if not all(c["ok"] for c in checks):
            print("correctness check FAILED; not timing", file=sys.stderr)
            _write_json(args.json, report)
            return 1
        if args.check_only:
            _write_json(args.json, report)
            return 0

    ceilings = measure_ceilings(args.rep_ms)
    report["ceilings"] = ceilings
    print(f"\nceilings: bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s, "
          f"device copy {ceilings['copy_gbps']:.0f} GB/s (read + write)")
    if args.prefill_tokens:
        report["prefill"] = bench_prefill(args, ceilings)
    if args.decode_contexts and args.decode_batches:
        report["decode"] = bench_decode(args, ceilings)
    _write_json(args.json, report)
    return 0


def _write_json(path: str | None, report: dict[str, object]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
