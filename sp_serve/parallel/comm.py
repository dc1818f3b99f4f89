"""The tensor collectives the attention algorithms use, behind one small interface.

Every rank calls the same collectives in the same order (they all run the same StepPlan), so
no message carries its shape: each caller derives the shapes from the shared plan.

- `DistComm`: torch.distributed over a process group (the default one, or an SP or TP
  group of a TP x SP grid): NCCL on GPUs, gloo on CPU. The ring is
  double-buffered (`batch_isend_irecv`): the block for step s+1 travels while step s computes.
- `ShmComm` (parallel/shm.py): CPU ranks on one host exchange through shared memory. A gloo
  collective costs ~1.2 ms on a 2-vCPU VM (a socket wake-up per message), which at one or
  two collectives per layer is most of a decode step; shared memory costs ~25 us.

Legend: t tokens (or rows), n ranks.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

# torch >= 2.12 renames all_gather_into_tensor; keep both so torch 2.11 works too
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CommStats:
    """Seconds spent waiting in collectives that were meant to hide behind compute (the ring's
    next block), process-wide. CPU only: it is wall-clock on the host, and on CUDA a wait
    returns once the transfer is ordered on the stream, so a CUDA ring counts nothing here
    (waits stays 0: no number rather than a false one). On GPUs read the overlap off a
    profiler trace (torch.profiler) instead."""

    exposed_wait_s: float = 0.0
    waits: int = 0


class Pending:
    """A collective in flight; wait() returns its result."""

    def __init__(self, result: torch.Tensor, works: list | None = None):
        self._result, self._works = result, works or []

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        return self._result


class DistComm:
    """torch.distributed collectives on the default process group."""

    name = "dist"
    overlaps = True  # async ops really run in the background: micro-batching pays

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup | None = None):
        """rank, world_size: this rank's place in `group` (None: the default group)."""
        self.rank, self.world_size, self.group = rank, world_size, group
        # global rank of each group rank: point-to-point ops and reduce name global ranks
        self._global = ([dist.get_global_rank(group, r) for r in range(world_size)]
                        if group is not None else list(range(world_size)))

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[n * t0, ...]: every rank's tensor (same shape on every rank), in rank order."""
        return self.all_gather_start(t).wait()

    def all_gather_start(self, t: torch.Tensor) -> Pending:
        out = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        return Pending(out, [_all_gather_single(out, t.contiguous(), group=self.group,
                                                async_op=True)])

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """t [n * w, ...]: rows [r*w, (r+1)*w) go to rank r; returns [n * w, ...], rank r's rows
        for this rank at [r*w, (r+1)*w)."""
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=self.group)
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, the same on every rank (may reuse t's storage)."""
        dist.all_reduce(t, group=self.group)
        return t

    def ring(self, block: torch.Tensor, shape_of: Callable[[int], tuple[int, ...]]
             ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields (src, src's block) for src = rank, rank-1, ... (every rank's block once). Between
        yields the caller computes while the next block travels; shape_of(src) is src's block
        shape. A block must be consumed before the next one is asked for."""
        for step in range(self.world_size):
            src = (self.rank - step) % self.world_size
            pending = None
            if step + 1 < self.world_size:
                pending = self._pass_on(block, shape_of((src - 1) % self.world_size))
            yield src, block
            if pending is not None:
                if block.device.type != "cpu":  # see CommStats: not measurable on the host
                    block = pending.wait()
                    continue
                t0 = time.perf_counter()
                block = pending.wait()
                CommStats.exposed_wait_s += time.perf_counter() - t0
                CommStats.waits += 1

    def _pass_on(self, send_t: torch.Tensor, recv_shape: tuple[int, ...]) -> Pending:
        """Sends send_t to the next rank and receives the previous rank's block."""
        recv_t = torch.empty(recv_shape, dtype=send_t.dtype, device=send_t.device)
        ops = []
        # Empty tensors are not sent: both ends know the sizes, so they skip the same messages.
        if send_t.numel() > 0:
            ops.append(dist.P2POp(dist.isend, send_t.contiguous(),
                                  self._global[(self.rank + 1) % self.world_size], self.group))
        if recv_t.numel() > 0:
            ops.append(dist.P2POp(dist.irecv, recv_t,
                                  self._global[(self.rank - 1) % self.world_size], self.group))
        return Pending(recv_t, dist.batch_isend_irecv(ops) if ops else [])

    def sum_to_first(self, t: torch.Tensor) -> torch.Tensor | None:
        """Sum over ranks of t, on rank 0 (None elsewhere). Used to collect rows each owned by one
        rank (the others send zeros), so it is exact."""
        dist.reduce(t, dst=self._global[0], group=self.group)
        return t if self.rank == 0 else None

    def close(self) -> None:
        pass


class SingleComm(DistComm):
    """World size 1: every collective is the identity (no process group needed)."""

    name = "none"

    def __init__(self) -> None:
        super().__init__(0, 1)

    def all_gather_start(self, t: torch.Tensor) -> Pending:
        return Pending(t)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def ring(self, block, shape_of):
        yield 0, block

    def sum_to_first(self, t: torch.Tensor) -> torch.Tensor:
        return t


Communicator = DistComm  # the interface; ShmComm implements the same methods
