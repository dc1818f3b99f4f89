"""Starting ranks: under torchrun the launched processes are the ranks; otherwise rank 0 is
this process and ranks 1..N-1 are spawned here (spawn, not fork: torch state must not be
inherited). Rank 0 hosts the rendezvous store and watches its children while they start, so a
rank that fails to start is reported at once instead of after the store's timeout. Spawned ranks
are daemonic: a normal exit of rank 0 leaves none behind, and a rank that loses rank 0 fails
its next collective and exits.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time
from typing import Any, Callable

import torch.distributed as dist

from sp_serve.parallel.groups import launched_by_torchrun

_HOST = "127.0.0.1"


def torchrun_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def client_store(port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(_HOST, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def spawn_ranks(world_size: int, entry: Callable[..., Any], args: tuple, timeout_s: float
                ) -> tuple[dist.TCPStore, list[mp.Process]]:
    """Spawns ranks 1..world_size-1 running entry(rank, world_size, store_port, *args); returns
    rank 0's store at once (the ranks load their models meanwhile: see wait_for_ranks)."""
    store = dist.TCPStore(_HOST, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, world_size):
        p = ctx.Process(target=entry, args=(rank, world_size, store.port, *args), daemon=True,
                        name=f"sp-serve-rank{rank}")
        p.start()
        procs.append(p)
    return store, procs


def wait_for_ranks(store: dist.Store, procs: list[mp.Process], timeout_s: float) -> None:
    """Rank 0: waits until every spawned rank has announced itself ready, failing fast (and
    killing the others) if one exits first."""
    deadline = time.monotonic() + timeout_s
    for rank, p in enumerate(procs, start=1):
        while not _joined(store, rank):
            if p.exitcode is not None:
                kill(procs)
                raise RuntimeError(f"rank {rank} exited with code {p.exitcode} while starting; "
                                   "its error is printed above")
            if time.monotonic() > deadline:
                kill(procs)
                raise RuntimeError(f"rank {rank} did not start within {timeout_s:.0f} s")
            time.sleep(0.05)


def announce_joined(store: dist.Store, rank: int) -> None:
    store.set(f"sp_serve/joined/{rank}", "1")


def _joined(store: dist.Store, rank: int) -> bool:
    return store.check([f"sp_serve/joined/{rank}"])


def kill(procs: list[mp.Process]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(timeout=5)


def _run_entry(rank, world, port, threads, cpu_comm, fn, args, out_q):
    import io
    import traceback

    import torch

    from sp_serve.parallel.groups import init_parallel, shutdown_parallel
    try:
        torch.set_num_threads(threads)
        store = dist.TCPStore(_HOST, port, world, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=600))
        pc = init_parallel(rank, world, store, torch.device("cpu"), timeout_s=600, cpu_comm=cpu_comm)
        result = fn(pc, *args)
        shutdown_parallel(pc)
        # bytes, not tensors: a tensor in a queue is shared memory that dies with this process
        buf = io.BytesIO()
        torch.save(result, buf)
        out_q.put((rank, "ok", buf.getvalue()))
    except BaseException:
        out_q.put((rank, "error", traceback.format_exc()))


def run_on_ranks(world: int, fn: Callable[..., Any], *args, threads: int = 1,
                 timeout_s: float = 1800, cpu_comm: str = "auto") -> list[Any]:
    """Runs fn(pc, *args) on `world` fresh CPU processes (gloo groups; tensors through shared
    memory unless cpu_comm="gloo"); returns every rank's result, in rank order. For tests and
    benchmarks (fn must be importable by spawn)."""
    import io

    import torch
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_run_entry, args=(r, world, port, threads, cpu_comm, fn, args, out_q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, status, payload = out_q.get(timeout=timeout_s)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        kill_after = time.monotonic() + 10
        for p in procs:
            p.join(timeout=max(0.0, kill_after - time.monotonic()))
        kill(procs)
    return [results[r] for r in range(world)]


__all__ = ["run_on_ranks", "announce_joined", "client_store", "kill", "launched_by_torchrun", "spawn_ranks",
           "torchrun_rank", "wait_for_ranks"]


def free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return s.getsockname()[1]
