"""The collectives the attention algorithms use (parallel/comm.py, parallel/shm.py), on real
processes: shared memory and gloo give exactly what the inputs say, whatever the shapes (unequal
per rank, empty, larger than a shared-memory region), and a rank that dies mid-collective fails
its peers at once instead of hanging them."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from tests.dist_util import run_on_ranks
from tests.sp_jobs import comm_jobs


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("cpu_comm", ["shm", "gloo"])
def test_collectives_are_exact(world, cpu_comm):
    results = run_on_ranks(world, comm_jobs, cpu_comm=cpu_comm)
    assert [name for name, ok in results if not ok] == []


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_messages_larger_than_a_region_go_in_rounds(world):
    # 4 KiB regions: the 300-row all-gather (18 KB) and the 400-token ring blocks take rounds.
    results = run_on_ranks(world, comm_jobs, 4096)
    assert [name for name, ok in results if not ok] == []


def _dying_rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from sp_serve.parallel.groups import init_parallel
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    pc = init_parallel(rank, 2, store, torch.device("cpu"), timeout_s=60, cpu_comm="shm")
    pc.comm.all_gather(torch.ones(4))  # both alive: fine
    if rank == 1:
        import os
        os._exit(3)  # dies before the next collective
    try:
        pc.comm.all_gather(torch.ones(4))
        out.put("no error")
    except RuntimeError as exc:
        out.put(str(exc))


def test_a_rank_that_dies_fails_the_shared_memory_collective_at_once():
    from sp_serve.parallel.launch import free_port
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_dying_rank, args=(r, port, out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        message = out.get(timeout=120)  # a hang fails here
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    # Its death was noticed ("exited"), not waited out ("did not reach ... within 60 s").
    assert "rank 1" in message and "exited during a collective" in message
