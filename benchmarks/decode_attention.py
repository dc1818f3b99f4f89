"""Decode attention of the torch backend (the CPU path) over one rank's paged KV pool: the
batched layout (attention/batched_decode.py) against the per-sequence path it replaced.

    python benchmarks/decode_attention.py [--batches 1 4 8 16] [--contexts 100 600 2000 8000]
        [--tail 16] [--kv-cache-dtype auto] [--piece-tokens N] [--max-padding N] [--group-tokens N]
        [--json out.json]

For each batch size and context (tokens per sequence on this rank; plus a "mixed" batch of
lengths 90-6000), sequences are written as a real engine leaves them: each prompt in one run of
consecutive blocks, then --tail decode tokens per sequence, one at a time, round robin, in the
highest free blocks (a decode tail apart from its prompt). Then, one thread, SmolLM2-135M's
attention shape (9 q / 3 KV heads, head_dim 64, fp32): a step's partials (o, lse) for one query
per sequence over every layer, timed as the worker runs it (the layout is built once per step,
then each layer attends), median of --reps steps:
  - per_sequence: the old path, one sequence at a time: its longest run as a view of the pool,
    the other runs copied, two attention calls, an lse merge, then a cat of the batch;
  - batched: `DecodeShards` with the torch backend now.
The pool has as many layers as make it at least --min-pool-mib (at most --layers), so each
layer reads K/V from memory, not from the cache of the layer before; times are scaled to
--layers. Slots never written hold NaN (the batched path must not let them through). Both
results are compared (max |difference| printed); it asserts nothing. --piece-tokens,
--max-padding and --group-tokens override batched_decode's constants (to tune them).

    python benchmarks/decode_attention.py --engine MODEL [--contexts ..] [--batches ..]

instead times decode-only steps of a real engine (SP=1, one thread) on the checkpoint, the
per-sequence path and the batched one alternating step by step in one process, and prints each
path's cost per decoding sequence (the step-time slope between the smallest and largest batch).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HQ, HKV, D, BLOCK = 9, 3, 64, 16


def build_pool(lens: list[int], tail: int, layers: int, kv_cache_dtype: str, seed: int = 0):
    from sp_serve.kv.cache import PagedKVCache
    blocks = sum(-(-n // BLOCK) + 1 for n in lens) + 4
    kv = PagedKVCache(layers, blocks, BLOCK, HKV, D, torch.float32, torch.device("cpu"),
                      kv_cache_dtype)
    g = torch.Generator().manual_seed(seed)
    for t in kv._tensors():  # slots never written hold NaN (0x7f: NaN in both fp8 formats)
        t.view(torch.uint8).fill_(0x7F) if t.element_size() == 1 else t.fill_(float("nan"))

    def write(seq: int, count: int, decode: bool) -> None:
        slots = kv.append_slots(seq, count, decode=decode)
        for layer in range(layers):
            kv.write(layer, slots, torch.randn(count, HKV, D, generator=g),
                     torch.randn(count, HKV, D, generator=g))

    for seq, n in enumerate(lens):
        write(seq, max(1, n - tail), False)
    for t in range(tail):
        for seq, n in enumerate(lens):
            if kv.num_tokens(seq) < n:
                write(seq, 1, True)
    return kv


def per_sequence_step(kv, seq_ids: list[int], q_bhd: torch.Tensor, scale: float, layers: int):
    """The per-sequence path this project used before (its DecodeShards torch branch)."""
    from sp_serve.attention.local import attention_over_pieces
    from sp_serve.attention.sharded_cache import pack_partial
    runs = [kv.runs(s) for s in seq_ids]
    out = None
    for layer in range(layers):
        parts = []
        for b in range(len(seq_ids)):
            pieces = kv.read_pieces(layer, runs[b])
            parts.append(pack_partial(*attention_over_pieces(q_bhd[b:b + 1], pieces, scale)))
        out = torch.cat(parts)
    return out


def batched_step(kv, seq_ids: list[int], q_bhd: torch.Tensor, scale: float, layers: int):
    from sp_serve.attention.sharded_cache import DecodeShards
    shards = DecodeShards(kv, seq_ids, scale, "torch", paged=False)
    out = None
    for layer in range(layers):
        out = shards.partial(layer, q_bhd, slice(0, len(seq_ids)))
    return out


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def engine_ab(model: str, contexts: list[int], batches: list[int], reps: int) -> list[dict]:
    """Decode-only steps of a real engine (SP=1, one thread, fcfs), the old per-sequence path and
    the batched one alternating step by step in the same process (the machine's noise hits
    both alike): median step time of each per (context, batch)."""
    from sp_serve import LLM
    from sp_serve.attention import sharded_cache
    from sp_serve.attention.local import attention_over_pieces
    from sp_serve.attention.sharded_cache import pack_partial
    old = {"on": False}
    batched = sharded_cache.DecodeShards.partial

    def partial(self, layer, q_bhd, rows):
        if self.paged or not old["on"]:
            return batched(self, layer, q_bhd, rows)
        if not hasattr(self, "_runs"):  # as the old path: the runs once per step
            self._runs = [self.kv.runs(s) for s in self.seq_ids]
        return torch.cat([pack_partial(*attention_over_pieces(
            q_bhd[b:b + 1], self.kv.read_pieces(layer, self._runs[b]), self.scale))
            for b in range(rows.start, rows.stop)])

    sharded_cache.DecodeShards.partial = partial
    llm = LLM(model, sp_size=1, cpu_threads=1, scheduler="fcfs", enable_prefix_caching=False,
              max_num_batched_tokens=8192)
    engine, rows = llm.engine, []
    try:
        for c in contexts:
            ctx: dict[int, int] = {}
            ids = [-100 - i for i in range(max(batches))]
            for sid in ids:
                engine._profile_step([(sid, 0, c)], [], ctx)
            for b in batches:
                times: dict[bool, list[float]] = {True: [], False: []}
                for i in range(2 * reps):
                    old["on"] = bool(i % 2)
                    got: list = []
                    engine._profile_step([], ids[:b], ctx, got)
                    times[old["on"]].append(got[0][3])
                row = {"context": c, "batch": b,
                       "per_sequence_ms": 1e3 * statistics.median(times[True]),
                       "batched_ms": 1e3 * statistics.median(times[False])}
                rows.append(row)
                print(f"engine, context {c:5d}, batch {b:3d}: decode step per-sequence "
                      f"{row['per_sequence_ms']:7.1f} ms, batched {row['batched_ms']:7.1f} ms",
                      flush=True)
            engine._release_profile(ids)
    finally:
        llm.shutdown()
    for c in contexts:  # the slope between the smallest and largest batch: ms per sequence
        r = [x for x in rows if x["context"] == c]
        lo, hi = r[0], r[-1]
        if hi["batch"] > lo["batch"]:
            n = hi["batch"] - lo["batch"]
            old_ms = (hi["per_sequence_ms"] - lo["per_sequence_ms"]) / n
            new_ms = (hi["batched_ms"] - lo["batched_ms"]) / n
            print(f"engine, context {c}: per decoding sequence per step {old_ms:.2f} ms "
                  f"per-sequence path, {new_ms:.2f} ms batched", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--contexts", type=int, nargs="+", default=[100, 600, 2000, 8000])
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed-length batches")
    p.add_argument("--tail", type=int, default=16, help="decode tokens apart from the prompt")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--layers", type=int, default=30, help="times are scaled to this many layers")
    p.add_argument("--min-pool-mib", type=float, default=256)
    p.add_argument("--max-pool-mib", type=float, default=3072,
                   help="skip cases whose one-layer K/V exceed this")
    p.add_argument("--piece-tokens", type=int, default=None, help="PIECE_TOKENS override")
    p.add_argument("--max-padding", type=int, default=None, help="MAX_PADDING override")
    p.add_argument("--group-tokens", type=int, default=None, help="GROUP_TOKENS override")
    p.add_argument("--no-baseline", action="store_true", help="time the batched path only")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--engine", metavar="MODEL", default=None,
                   help="instead: decode steps of a real engine on this checkpoint (SP=1)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.engine:
        rows = engine_ab(args.engine, args.contexts, args.batches, args.reps)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"engine": args.engine, "rows": rows,
                                             "load_avg_at_end": os.getloadavg()}, indent=1))
        return
    from sp_serve.attention import batched_decode
    if args.piece_tokens is not None:
        batched_decode.PIECE_TOKENS = args.piece_tokens
    if args.max_padding is not None:
        batched_decode.MAX_PADDING = args.max_padding
    if args.group_tokens is not None:
        batched_decode.GROUP_TOKENS = args.group_tokens
    cases = [(b, [c] * b) for c in args.contexts for b in args.batches]
    if not args.no_mixed:
        mixed = [150, 200, 6000, 250, 180, 600, 120, 90, 2000, 300, 140, 170, 220, 160, 110, 400]
        cases += [(b, mixed[:b]) for b in args.batches if b >= 4]
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "torch": torch.__version__, "load_avg_at_start": os.getloadavg()}
    print(f"one thread; {HQ}/{HKV} heads, head_dim {D}, fp32, KV {args.kv_cache_dtype}, "
          f"tail {args.tail}; machine {machine}", flush=True)
    print(f"{'batch':>5} {'context':>18} {'layers':>6} | {'per-seq ms/step':>15} "
          f"{'batched ms/step':>15} | {'us/seq/layer':>12} {'batched':>8} | {'speed-up':>8} "
          f"{'max|diff|':>9}", flush=True)
    rows = []
    scale = D ** -0.5
    for b, lens in cases:
        bytes_per_token = HKV * D * 2 * (4 if args.kv_cache_dtype == "auto" else 1)
        layer_mib = sum(lens) * bytes_per_token / 2**20
        if layer_mib > args.max_pool_mib:
            continue
        layers = max(2, min(args.layers, math.ceil(args.min_pool_mib / max(layer_mib, 1e-3))))
        kv = build_pool(lens, args.tail, layers, args.kv_cache_dtype)
        q = torch.randn(b, HQ, D, generator=torch.Generator().manual_seed(1))
        ids = list(range(b))
        want = per_sequence_step(kv, ids, q, scale, layers)
        got = batched_step(kv, ids, q, scale, layers)
        diff = float((got - want).abs().max())
        t_old = math.nan if args.no_baseline else timed(
            lambda: per_sequence_step(kv, ids, q, scale, layers), args.reps)
        t_new = timed(lambda: batched_step(kv, ids, q, scale, layers), args.reps)
        f = args.layers / layers
        ctx = str(lens[0]) if len(set(lens)) == 1 else f"mixed {min(lens)}-{max(lens)}"
        row = {"batch": b, "lens": lens, "layers_timed": layers,
               "per_sequence_ms_per_step": 1e3 * t_old * f, "batched_ms_per_step": 1e3 * t_new * f,
               "max_abs_diff": diff}
        rows.append(row)
        print(f"{b:5d} {ctx:>18} {layers:6d} | {row['per_sequence_ms_per_step']:15.2f} "
              f"{row['batched_ms_per_step']:15.2f} | {1e6 * t_old / layers / b:12.1f} "
              f"{1e6 * t_new / layers / b:8.1f} | {t_old / t_new:7.2f}x {diff:9.1e}", flush=True)
        del kv
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"machine": machine, "args": vars(args) | {"json": str(args.json)}, "rows": rows,
               "load_avg_at_end": os.getloadavg()}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
