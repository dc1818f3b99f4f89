"""The ring communicator: each step every rank sends the K/V block in hand to rank+1 and
receives rank-1's, double-buffered so the transfer for step s+1 runs while step s computes.

Block sizes differ between ranks (a prompt length need not divide by 2N), so the receiver is
told the incoming shape by the caller, who derives it from the shared zigzag layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sp_serve.parallel.groups import ParallelContext


class RingExchange:
    """One in-flight exchange: send `send_t` to the next rank, receive into a fresh buffer."""

    def __init__(self, pc: ParallelContext, send_t: torch.Tensor, recv_shape: tuple[int, ...]):
        self.recv_t = torch.empty(recv_shape, dtype=send_t.dtype, device=send_t.device)
        ops = []
        # Empty tensors are not sent: both ends know the sizes, so they skip the same messages.
        if send_t.numel() > 0:
            ops.append(dist.P2POp(dist.isend, send_t.contiguous(), pc.next_rank))
        if self.recv_t.numel() > 0:
            ops.append(dist.P2POp(dist.irecv, self.recv_t, pc.prev_rank))
        self._works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        return self.recv_t
