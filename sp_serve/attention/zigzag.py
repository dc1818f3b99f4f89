"""Zigzag partition of a prompt over N ranks.

Causal attention costs grow with position, so a contiguous split gives the last rank ~2N-1 times
the work of the first. Cut the n tokens into 2N chunks and give rank r chunks r and 2N-1-r:
each rank then pairs an early (cheap) chunk with a late (expensive) one, and every rank does
the same causal work. Lengths need not divide: the first n % 2N chunks get one extra token, and
chunks may be empty when n < 2N.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class ZigzagLayout:
    num_tokens: int
    world_size: int

    @cached_property
    def chunk_bounds(self) -> list[tuple[int, int]]:
        num_chunks = 2 * self.world_size
        base, extra = divmod(self.num_tokens, num_chunks)
        bounds, start = [], 0
        for c in range(num_chunks):
            end = start + base + (1 if c < extra else 0)
            bounds.append((start, end))
            start = end
        return bounds

    def chunks_of(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(early chunk, late chunk) of a rank, as [start, end) token indices."""
        return self.chunk_bounds[rank], self.chunk_bounds[2 * self.world_size - 1 - rank]

    def chunk_lens(self, rank: int) -> tuple[int, int]:
        (a0, a1), (b0, b1) = self.chunks_of(rank)
        return a1 - a0, b1 - b0

    def num_local(self, rank: int) -> int:
        return sum(self.chunk_lens(rank))

    def local_indices(self, rank: int) -> torch.Tensor:
        (a0, a1), (b0, b1) = self.chunks_of(rank)
        return torch.cat([torch.arange(a0, a1), torch.arange(b0, b1)])

    def owner_of(self, index: int) -> int:
        """The rank holding token `index` (0 <= index < num_tokens)."""
        for c, (start, end) in enumerate(self.chunk_bounds):
            if start <= index < end:
                return c if c < self.world_size else 2 * self.world_size - 1 - c
        raise IndexError(index)
