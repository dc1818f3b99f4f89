"""Runs a function on N real processes joined by gloo, and returns rank 0's result.

Process start is the slow part on 2 cores, so tests pass a whole list of cases to one spawn.
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import traceback

import torch
import torch.distributed as dist

from sp_serve.parallel.groups import init_parallel, shutdown_parallel
from sp_serve.parallel.launch import free_port


def _entry(rank, world, port, fn, args, out_q):
    try:
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=120))
        pc = init_parallel(rank, world, store, torch.device("cpu"), timeout_s=120)
        result = fn(pc, *args)
        shutdown_parallel()
        # bytes, not tensors: a tensor in a queue is shared memory that dies with this process
        buf = io.BytesIO()
        torch.save(result if rank == 0 else None, buf)
        out_q.put((rank, "ok", buf.getvalue()))
    except BaseException:
        out_q.put((rank, "error", traceback.format_exc()))


def run_on_ranks(world: int, fn, *args, timeout_s: float = 600):
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out_q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, status, payload = out_q.get(timeout=timeout_s)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results[0]
