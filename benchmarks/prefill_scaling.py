"""Prefill scaling on the CPU: TTFT of one long prompt at SP=1 and SP=2 (one torch thread per
rank), Hugging Face transformers' forward on the same checkpoint (one thread), the share of ring
communication hidden behind compute, and per-rank peak memory for a longer prompt.

    python benchmarks/prefill_scaling.py [--tokens 8192] [--mem-tokens 32768] [--json out.json]

It measures and prints; it asserts nothing. Every SP degree runs on fresh processes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sp_serve.parallel.comm import CommStats
from sp_serve.attention.zigzag import ZigzagLayout
from sp_serve.engine.plan import PrefillChunk, StepPlan
from sp_serve.engine.worker import Worker
from sp_serve.kv.cache import PagedKVCache
from sp_serve.model.loader import load_model
from sp_serve.parallel.launch import run_on_ranks

SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=65536)
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every 2 ms; peak above the starting level."""

    def __init__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return self.peak - self.base


def prefill_flops(spec, n: int) -> float:
    dense = 2 * n * spec.num_layers * (spec.hidden_size * (spec.q_size + 2 * spec.kv_size)
                                       + spec.q_size * spec.hidden_size
                                       + 3 * spec.hidden_size * spec.intermediate_size)
    attention = 4 * spec.num_layers * spec.num_heads * spec.head_dim * n * (n + 1) / 2  # QK^T and PV
    return dense + attention + 2 * spec.hidden_size * spec.vocab_size  # lm_head: last token only


def _rank(pc, ckpt: str, n: int, reps: int):
    model, spec = load_model(ckpt, dtype=torch.float32)
    layout = ZigzagLayout(n, pc.world_size)
    local = layout.num_local(pc.rank)
    kv = PagedKVCache(spec.num_layers, local // 16 + 2, 16, spec.num_kv_heads, spec.head_dim,
                      torch.float32, pc.device)
    worker = Worker(pc, model, spec, kv)
    ids = torch.randint(3, spec.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    times, waits, mem = [], [], None
    for rep in range(reps):
        CommStats.exposed_wait_s = 0.0
        dist.barrier()
        meter = PeakRSS() if rep == 0 else None
        t0 = time.perf_counter()
        worker.execute(StepPlan(prefill=[PrefillChunk(0, ids, 0, True, n)]))
        dist.barrier()
        times.append(time.perf_counter() - t0)
        waits.append(CommStats.exposed_wait_s)
        if meter is not None:
            mem = meter.stop()
        worker.execute(StepPlan(free_seq_ids=[0]))
    # the same ring transfers with no compute in between: what there was to hide
    comm = 0.0
    if pc.world_size > 1:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(spec.num_layers):
            block = torch.randn(2, local, spec.num_kv_heads, spec.head_dim)
            for _ in pc.comm.ring(block, lambda src: (2, layout.num_local(src), *block.shape[2:])):
                pass
        comm = time.perf_counter() - t0
    best = min(range(reps), key=lambda i: times[i])
    return {"seconds": times[best], "exposed_wait_s": waits[best], "comm_only_s": comm, "peak_mem_bytes": mem,
            "flops": prefill_flops(spec, n), "local_tokens": local}


def _matmul_rate(pc, seconds: float = 6.0):
    """GFLOP/s of an MLP-shaped fp32 matmul on this rank while every rank runs one at once: the
    machine's own ceiling for N single-thread processes (shared cores, memory, throttling)."""
    a, b = torch.randn(2048, 512), torch.randn(512, 1536)
    for _ in range(3):
        a @ b
    dist.barrier()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 2048 * 512 * 1536 * n / (time.perf_counter() - t0) / 1e9


def _hf(pc, ckpt: str, n: int, reps: int):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return {"seconds": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--mem-tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from sp_serve.model.tiny import make_tiny_model
    ckpt = str(make_tiny_model(Path(tempfile.mkdtemp()) / "bench-model", **SHAPE))
    out = {"model": SHAPE, "tokens": args.tokens, "mem_tokens": args.mem_tokens, "threads_per_rank": 1,
           "device": "cpu", "runs": {}}
    for sp in args.sp:
        rates = run_on_ranks(sp, _matmul_rate)
        out["runs"][f"matmul_sp{sp}"] = rates
        print(f"{sp} concurrent single-thread matmul processes: "
              + ", ".join(f"{x:.1f}" for x in rates) + " GFLOP/s", flush=True)
    for sp in args.sp:
        r = run_on_ranks(sp, _rank, ckpt, args.tokens, args.reps)
        out["runs"][f"sp{sp}"] = r
        print(f"SP={sp}: TTFT {r[0]['seconds']:.2f} s", flush=True)
    if not args.no_hf:
        out["runs"]["hf"] = run_on_ranks(1, _hf, ckpt, args.tokens, args.reps)
        print(f"transformers: {out['runs']['hf'][0]['seconds']:.2f} s", flush=True)
    if args.mem_tokens:
        for sp in args.sp:
            r = run_on_ranks(sp, _rank, ckpt, args.mem_tokens, 1)
            out["runs"][f"mem_sp{sp}"] = r
            print(f"SP={sp} @ {args.mem_tokens}: TTFT {r[0]['seconds']:.1f} s, peak "
                  f"{max(x['peak_mem_bytes'] for x in r) / 2**20:.0f} MiB/rank", flush=True)
    report(out, args.sp)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def report(out: dict, sps: list[int]) -> None:
    runs = out["runs"]
    base = runs[f"sp{sps[0]}"][0]["seconds"] if f"sp{sps[0]}" in runs else None
    print(f"\nprefill of {out['tokens']} tokens, hidden 512, 8 layers, 8 heads / 2 KV heads, fp32, 1 thread per rank")
    print(f"{'config':<14}{'TTFT s':>9}{'speedup':>9}{'par.eff':>9}{'GFLOP/s/rank':>14}{'ring hidden':>13}")
    for sp in sps:
        r = runs[f"sp{sp}"]
        t = max(x["seconds"] for x in r)
        speed = base / t
        comm = max(x["comm_only_s"] for x in r)
        exposed = max(x["exposed_wait_s"] for x in r)
        hidden = "-" if comm == 0 else f"{100 * max(0.0, 1 - exposed / comm):.0f}%"
        print(f"{'SP=' + str(sp):<14}{t:>9.2f}{speed:>9.2f}{speed / sp * sps[0]:>9.2f}"
              f"{r[0]['flops'] / t / sp / 1e9:>14.1f}{hidden:>13}")
    if "hf" in runs:
        t = runs["hf"][0]["seconds"]
        print(f"{'transformers':<14}{t:>9.2f}{base / t:>9.2f}")
    solo = runs.get(f"matmul_sp{sps[0]}")
    if solo:
        print("\nthe machine's own scaling (independent matmuls, one thread per process, all at once):")
        for sp in sps:
            agg = sum(runs[f"matmul_sp{sp}"])
            print(f"  {sp} process(es): {agg:6.1f} GFLOP/s in all = {agg / sum(solo):.2f}x of {sps[0]} "
                  f"(ideal {sp / sps[0]:.0f}x)")
    mems = {sp: max(x["peak_mem_bytes"] for x in runs[f"mem_sp{sp}"]) for sp in sps if f"mem_sp{sp}" in runs}
    if mems:
        first = mems[sps[0]]
        print(f"\nper-rank peak memory above the loaded model, prefill of {out['mem_tokens']} tokens:")
        for sp, m in mems.items():
            print(f"  SP={sp}: {m / 2**20:8.0f} MiB  ({m / first:.2f}x of SP={sps[0]})")


if __name__ == "__main__":
    main()
