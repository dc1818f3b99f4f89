"""The engine's view of KV memory on every rank: pure accounting, no tensors.

For each sequence it knows how many tokens each rank stores; blocks per rank follow as
ceil(tokens / block_size), the same arithmetic the ranks' PagedKVCache allocators use, so the
two never disagree. Admission asks `can_hold` for every rank; decode placement picks the rank
that keeps the sequence's shards balanced.
"""
from __future__ import annotations

from sp_serve.attention.zigzag import ZigzagLayout


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockManager:
    def __init__(self, world_size: int, blocks_per_rank: int, block_size: int):
        self.world_size = world_size
        self.blocks_per_rank = blocks_per_rank
        self.block_size = block_size
        self.free_blocks = [blocks_per_rank] * world_size
        self.tokens: dict[int, list[int]] = {}  # seq_id -> tokens stored per rank

    def extra_blocks(self, seq_id: int, add: list[int]) -> list[int]:
        """Blocks each rank must add to store `add[r]` more tokens of the sequence."""
        have = self.tokens.get(seq_id, [0] * self.world_size)
        return [_blocks(h + a, self.block_size) - _blocks(h, self.block_size) for h, a in zip(have, add)]

    def can_hold(self, seq_id: int, add: list[int], reserve_blocks: int | list[int] = 0) -> bool:
        """Whether every rank can store `add[r]` more tokens of the sequence and still keep
        `reserve_blocks` (one count for every rank, or one per rank) free."""
        need = self.extra_blocks(seq_id, add)
        reserve = [reserve_blocks] * self.world_size if isinstance(reserve_blocks, int) else reserve_blocks
        return all(n + k <= f for n, k, f in zip(need, reserve, self.free_blocks))

    def allocate(self, seq_id: int, add: list[int]) -> None:
        need = self.extra_blocks(seq_id, add)
        assert all(n <= f for n, f in zip(need, self.free_blocks)), "allocate without can_hold"
        self.free_blocks = [f - n for f, n in zip(self.free_blocks, need)]
        have = self.tokens.setdefault(seq_id, [0] * self.world_size)
        for r, a in enumerate(add):
            have[r] += a

    def free(self, seq_id: int) -> None:
        have = self.tokens.pop(seq_id, None)
        if have is not None:
            for r, h in enumerate(have):
                self.free_blocks[r] += _blocks(h, self.block_size)

    def prefill_shares(self, num_tokens: int) -> list[int]:
        layout = ZigzagLayout(num_tokens, self.world_size)
        return [layout.num_local(r) for r in range(self.world_size)]

    def decode_rank(self, seq_id: int) -> int:
        """The rank that should store the sequence's next token: the one with the fewest tokens,
        ties broken by preferring a rank with room in its last block, then rotated by sequence
        id so ties do not all land on rank 0."""
        have = self.tokens.get(seq_id, [0] * self.world_size)

        def key(r: int) -> tuple[int, int, int]:
            needs_block = int(have[r] % self.block_size == 0)
            return have[r], needs_block, (r - seq_id) % self.world_size

        return min(range(self.world_size), key=key)

    def num_used_blocks(self) -> int:
        return self.world_size * self.blocks_per_rank - sum(self.free_blocks)

    def usage(self) -> float:
        return self.num_used_blocks() / max(1, self.world_size * self.blocks_per_rank)
