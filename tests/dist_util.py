"""Multi-rank tests run their cases inside one spawn per world size (process start is the slow
part on 2 cores); this returns rank 0's result, and a failing rank fails the test."""
from __future__ import annotations

from sp_serve.parallel.launch import run_on_ranks as _run


def run_on_ranks(world: int, fn, *args, timeout_s: float = 600, cpu_comm: str = "auto",
                 tp_size: int = 1):
    try:
        return _run(world, fn, *args, timeout_s=timeout_s, cpu_comm=cpu_comm, tp_size=tp_size)[0]
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None
