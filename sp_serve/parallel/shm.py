"""Collectives through shared memory, for CPU ranks on one host (x86-64 Linux).

Each rank owns one shared file in /dev/shm: a header page with its sequence counter, then two
message regions used alternately (even / odd collectives). A collective is: write the message
into this rank's region for the collective's parity, publish the new sequence number, wait until
every rank has published it, then read the others' regions. Why two regions suffice: a rank can
only start collective s+2 (which overwrites the region of s) after every rank has published
s+1, and a rank publishes s+1 only after it is done reading collective s. So a message read in
place stays valid until the reader's own next collective.

Ordering: x86-64 keeps stores in order (and loads in order), and glibc fences its non-temporal
copies, so a rank that sees the counter also sees the message written before it. On other
architectures this communicator is not used (gloo is).

Waiting spins (a message usually arrives within microseconds), then yields the CPU for up to a
millisecond, then sleeps in growing naps (up to 1 ms), so a rank that waits long (its peer was
descheduled on a busy machine, or is doing rank 0's extra work) gives its core away instead of
burning it; yields and naps release the GIL, so rank 0's HTTP thread runs meanwhile. Every
0.2 s it checks that the ranks it waits for are alive: a dead rank fails the collective within a
fraction of a second, not at the timeout.

The files are unlinked once every rank has mapped them, so nothing is left in /dev/shm even if a
rank is killed. Pages are committed only when written: the regions cost what the largest
message needed. A message larger than a region is sent in rounds.

Legend: n ranks, t rows.
"""
from __future__ import annotations

import mmap
import os
import platform
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from sp_serve.parallel.comm import CommStats, DistComm, Pending

_HEADER = 4096
_SPINS = 2000  # busy polls before yielding the CPU (tens of microseconds)
_YIELD_S = 1e-3  # then yield the CPU between polls for this long
_MAX_NAP_S = 1e-3  # then sleep between polls, doubling from 20 us up to this
_CHECK_EVERY_S = 0.2
DEFAULT_REGION_BYTES = 256 * 2**20


def shm_supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") and \
        os.path.isdir("/dev/shm")


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # a zombie is dead but still has a pid
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


class ShmComm(DistComm):
    name = "shm"
    overlaps = False  # a collective is done when it returns: micro-batching would only add rounds

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup, timeout_s: float,
                 region_bytes: int = DEFAULT_REGION_BYTES):
        """Collective over `group` (gloo, used only here to exchange file names)."""
        super().__init__(rank, world_size)
        self.timeout_s = timeout_s
        self.cap = region_bytes
        path = f"/dev/shm/sp-serve-{uuid.uuid4().hex}-rank{rank}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, _HEADER + 2 * region_bytes)
            own = mmap.mmap(fd, _HEADER + 2 * region_bytes)
        finally:
            os.close(fd)
        peers: list = [None] * world_size
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid(), path), group=group)
        try:
            if len({host for host, _, _ in peers}) != 1:
                raise ValueError("shared-memory collectives need every rank on one host")
            self._maps = []
            for r, (_, _, peer_path) in enumerate(peers):
                if r == rank:
                    self._maps.append(own)
                    continue
                fd = os.open(peer_path, os.O_RDWR)
                try:
                    self._maps.append(mmap.mmap(fd, _HEADER + 2 * region_bytes))
                finally:
                    os.close(fd)
            dist.barrier(group=group)  # everyone has mapped every file
        finally:
            os.unlink(path)
        self._pids = [pid for _, pid, _ in peers]
        self._flags = [np.frombuffer(m, dtype=np.int64, count=1) for m in self._maps]
        self._regions = [[torch.frombuffer(m, dtype=torch.uint8, offset=_HEADER + p * region_bytes,
                                           count=region_bytes) for p in (0, 1)] for m in self._maps]
        self._seq = 0

    # ---- the one primitive -----------------------------------------------------------------
    def _post(self, data_u8: torch.Tensor) -> int:
        """Writes this rank's message (at most one region) and publishes it; returns its seq."""
        self._seq += 1
        n = data_u8.numel()
        if n:
            self._regions[self.rank][self._seq & 1][:n].copy_(data_u8)
        self._flags[self.rank][0] = self._seq
        return self._seq

    def _wait(self, seq: int) -> None:
        for r in range(self.world_size):
            flag = self._flags[r]
            spins = 0
            while flag[0] < seq and spins < _SPINS:
                spins += 1
            if flag[0] >= seq:
                continue
            started = last_check = time.monotonic()
            nap = 2e-5
            while flag[0] < seq:
                now = time.monotonic()
                if now - started < _YIELD_S:
                    os.sched_yield()  # releases the GIL too
                    continue
                time.sleep(nap)
                nap = min(2 * nap, _MAX_NAP_S)
                if now - last_check > _CHECK_EVERY_S:
                    last_check = now
                    self._check_alive(r, now - started)

    def _check_alive(self, r: int, waited_s: float) -> None:
        if _dead(self._pids[r]):
            raise RuntimeError(f"rank {r} (pid {self._pids[r]}) exited during a collective")
        if waited_s > self.timeout_s:
            raise RuntimeError(f"rank {r} did not reach a collective within {self.timeout_s:.0f} s")

    def _view(self, r: int, seq: int, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self._regions[r][seq & 1][offset:offset + nbytes].view(dtype).view(shape)

    def _exchange(self, send: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Every rank's flat bytes (sizes[r] from rank r), copied out; in rounds when a message
        exceeds a region. The slow path for oversized messages."""
        send_u8 = send.contiguous().view(-1).view(torch.uint8)
        outs = [torch.empty(s, dtype=torch.uint8) for s in sizes]
        for lo in range(0, max(sizes), self.cap):
            seq = self._post(send_u8[lo:lo + self.cap])
            self._wait(seq)
            for r, out in enumerate(outs):
                n = max(0, min(sizes[r] - lo, self.cap))
                if n:
                    out[lo:lo + n].copy_(self._regions[r][seq & 1][:n])
        return outs

    # ---- the collectives -------------------------------------------------------------------
    def all_gather_start(self, t: torch.Tensor) -> Pending:
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes > self.cap:
            parts = self._exchange(t, [nbytes] * self.world_size)
            return Pending(torch.cat([p.view(t.dtype).view(t.shape) for p in parts]))
        seq = self._post(t.view(-1).view(torch.uint8))
        self._wait(seq)
        out = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype)
        for r, piece in enumerate(out.split(t.shape[0])):
            piece.copy_(t if r == self.rank else self._view(r, seq, 0, t.dtype, t.shape))
        return Pending(out)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        w = t.shape[0] // self.world_size
        row_shape = (w, *t.shape[1:])
        nbytes = t.numel() * t.element_size()
        out = torch.empty_like(t)
        if nbytes > self.cap:
            parts = self._exchange(t, [nbytes] * self.world_size)
            for r, piece in enumerate(out.split(w)):
                piece.copy_(parts[r].view(t.dtype).view(t.shape)[self.rank * w:(self.rank + 1) * w])
            return out
        seq = self._post(t.view(-1).view(torch.uint8))
        self._wait(seq)
        mine_offset = self.rank * w * int(np.prod(t.shape[1:], dtype=np.int64)) * t.element_size()
        for r, piece in enumerate(out.split(w)):
            piece.copy_(t[self.rank * w:(self.rank + 1) * w] if r == self.rank
                        else self._view(r, seq, mine_offset, t.dtype, row_shape))
        return out

    def ring(self, block: torch.Tensor, shape_of: Callable[[int], tuple[int, ...]]
             ) -> Iterator[tuple[int, torch.Tensor]]:
        """One collective: every block is posted at once and read in place (no copy), in ring
        order, so the caller's loop is the same as on a real ring."""
        block = block.contiguous()
        sizes = [int(np.prod(shape_of(r), dtype=np.int64)) * block.element_size()
                 for r in range(self.world_size)]
        if max(sizes) > self.cap:
            parts = self._exchange(block, sizes)
            blocks = [p.view(block.dtype).view(shape_of(r)) for r, p in enumerate(parts)]
            for step in range(self.world_size):
                src = (self.rank - step) % self.world_size
                yield src, block if src == self.rank else blocks[src]
            return
        seq = self._post(block.view(-1).view(torch.uint8))
        yield self.rank, block  # computing on our own block first hides the others' writes
        t0 = time.perf_counter()
        self._wait(seq)
        CommStats.exposed_wait_s += time.perf_counter() - t0
        CommStats.waits += 1
        for step in range(1, self.world_size):
            src = (self.rank - step) % self.world_size
            yield src, self._view(src, seq, 0, block.dtype, shape_of(src))

    def sum_to_first(self, t: torch.Tensor) -> torch.Tensor | None:
        gathered = self.all_gather(t[None])
        return gathered.sum(0) if self.rank == 0 else None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        # Summed in rank order on every rank: the ranks of a TP group get identical results.
        return self.all_gather(t[None]).sum(0, dtype=t.dtype)

    def close(self) -> None:
        self._flags = self._regions = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a tensor still views it; the mapping goes with the process
                pass
        self._maps = []

