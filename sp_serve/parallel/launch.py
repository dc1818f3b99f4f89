"""Starting ranks: under torchrun the launched processes are the ranks; otherwise rank 0 is
this process and ranks 1..N-1 are started here as fresh interpreters running
`python -m sp_serve.parallel.rank_main`.

Not multiprocessing: its `spawn` start method re-imports the caller's `__main__` in every child,
so a script without an `if __name__ == "__main__":` guard would start ranks recursively (and a
notebook's or `python -c`'s functions cannot be found at all). A rank here imports only
sp_serve; its entry function and arguments arrive pickled on its stdin, and they must live in
importable modules (never `__main__`).

Rank 0 hosts the rendezvous store and watches its children while they start, so a rank that
fails to start is reported at once instead of after the store's timeout. No rank outlives rank 0:
a normal exit of rank 0 kills the ranks it started (atexit, as multiprocessing does for daemonic
children), and each rank holds the read end of a pipe from rank 0 and exits when it closes,
which the kernel does however rank 0 ends (even SIGKILL).
"""
from __future__ import annotations

import atexit
import datetime
import multiprocessing as mp
import os
import pickle
import struct
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from sp_serve.parallel.groups import launched_by_torchrun

_HOST = "127.0.0.1"
RANK_MODULE = "sp_serve.parallel.rank_main"  # what a rank's command line shows


def torchrun_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def client_store(port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(_HOST, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


class RankProcess:
    """One started rank: the little of multiprocessing.Process's interface the engine uses."""

    def __init__(self, rank: int, entry: Callable[..., Any], args: tuple):
        if entry.__module__ == "__main__":
            raise ValueError(f"{entry.__qualname__} is defined in __main__, which a rank never "
                             "imports; move it into an importable module")
        payload = pickle.dumps((entry, args))
        payload = struct.pack("<Q", len(payload)) + payload  # as rank_main.read_work reads it
        # the rank imports this very sp_serve, whatever the caller's working directory
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.rank = rank
        self._popen = subprocess.Popen([sys.executable, "-m", RANK_MODULE, str(rank)],
                                       stdin=subprocess.PIPE, env=env, close_fds=True)
        self.pid = self._popen.pid
        self._popen.stdin.write(payload)
        self._popen.stdin.flush()  # the pipe stays open: its end is the rank's signal to exit
        _LIVE.add(self)

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return
        self._close_pipe()

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()
        self.join(timeout=5)

    def _close_pipe(self) -> None:
        try:
            self._popen.stdin.close()
        except OSError:  # the rank is gone and the pipe broken
            pass
        _LIVE.discard(self)


_LIVE: weakref.WeakSet[RankProcess] = weakref.WeakSet()


@atexit.register
def _kill_live_ranks() -> None:
    for proc in list(_LIVE):
        proc.kill()


def spawn_ranks(world_size: int, entry: Callable[..., Any], args: tuple, timeout_s: float
                ) -> tuple[dist.TCPStore, list[RankProcess]]:
    """Starts ranks 1..world_size-1 running entry(rank, world_size, store_port, *args); returns
    rank 0's store at once (the ranks load their models meanwhile: see wait_for_ranks)."""
    store = dist.TCPStore(_HOST, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    procs = [RankProcess(rank, entry, (rank, world_size, store.port, *args))
             for rank in range(1, world_size)]
    return store, procs


def wait_for_ranks(store: dist.Store, procs: list[RankProcess], timeout_s: float) -> None:
    """Rank 0: waits until every started rank has announced itself ready, failing fast (and
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


def kill(procs: list) -> None:
    """Kills RankProcesses or multiprocessing Processes (run_on_ranks) that still run."""
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(timeout=5)


# ---- run_on_ranks: a function on N fresh CPU ranks, for tests and benchmarks ------------------
def _run_entry(rank, world, port, threads, cpu_comm, fn, args, out_q, tp_size=1):
    import io
    import traceback

    import torch

    from sp_serve.parallel.groups import init_parallel, shutdown_parallel
    try:
        torch.set_num_threads(threads)
        store = dist.TCPStore(_HOST, port, world, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=600))
        pc = init_parallel(rank, world, store, torch.device("cpu"), timeout_s=600, cpu_comm=cpu_comm,
                           tp_size=tp_size)
        result = fn(pc, *args)
        shutdown_parallel(pc)
        # bytes, not tensors: a tensor in a queue is shared memory that dies with this process
        buf = io.BytesIO()
        torch.save(result, buf)
        out_q.put((rank, "ok", buf.getvalue()))
    except BaseException:
        out_q.put((rank, "error", traceback.format_exc()))


def run_on_ranks(world: int, fn: Callable[..., Any], *args, threads: int = 1,
                 timeout_s: float = 1800, cpu_comm: str = "auto", tp_size: int = 1) -> list[Any]:
    """Runs fn(pc, *args) on `world` fresh CPU processes (gloo groups; tensors through shared
    memory unless cpu_comm="gloo"; a TP x SP grid of tp_size ranks per TP group); returns every
    rank's result, in rank order. For tests and
    benchmarks, whose callers guard their `__main__`: these ranks are multiprocessing's spawn
    children (fn must be importable by spawn)."""
    import io

    import torch
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_run_entry, args=(r, world, port, threads, cpu_comm, fn, args, out_q, tp_size),
                             daemon=True)
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


__all__ = ["RankProcess", "run_on_ranks", "announce_joined", "client_store", "kill", "launched_by_torchrun",
           "spawn_ranks", "torchrun_rank", "wait_for_ranks"]


def free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return s.getsockname()[1]
