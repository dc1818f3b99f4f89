"""What prefix caching needs beside the block counts: where a holder's tokens lie, and which
holder's tokens start a new prompt. Pure bookkeeping on rank 0 (no tensors).

The unit of reuse is a token prefix, not a block or a chunk. Along every rank's shard of a
sequence, positions increase: a prompt chunk's zigzag share is its early part then its late
part, each in order, later chunks and decoded tokens come after. So the tokens of any prefix
[0, c) of a sequence are the first L_r(c) tokens of rank r's shard, on every rank at once, and a
new sequence that starts with those c tokens can take them in place: the full blocks of each
rank's first L_r(c) slots are shared (ref-counted), a partly used last block is copied (at most
one block per rank). `ShardMap` computes L_r(c) from how the holder's tokens were placed.

`PrefixIndex` finds the holder with the longest common prefix: a chain hash per GROUP tokens
(vLLM's parent-hash + tokens, over token groups rather than blocks, since a block here holds a
rank's scattered share of positions), then a token-exact extension within the last group.
"""
from __future__ import annotations

from functools import lru_cache

GROUP = 16  # tokens per hashed group; the shortest prefix worth a lookup


@lru_cache(maxsize=4096)
def _zigzag_chunks(n: int, world_size: int) -> tuple[tuple[int, int, int, int], ...]:
    from sp_serve.attention.zigzag import ZigzagLayout
    layout = ZigzagLayout(n, world_size)
    return tuple((*layout.chunks_of(r)[0], *layout.chunks_of(r)[1]) for r in range(world_size))


class ShardMap:
    """How a holder's tokens were placed, in position order: segments (start, n, owner, limit)
    of n tokens from position `start`, all on rank `owner`, or (owner -1) zigzag-split as one
    prompt chunk; only positions below `limit` are held (a shared prefix may end mid-chunk)."""

    def __init__(self, world_size: int, segments: list[tuple[int, int, int, int]] | None = None):
        self.world_size = world_size
        self.segments = segments or []

    @property
    def num_tokens(self) -> int:
        if not self.segments:
            return 0
        start, n, _, limit = self.segments[-1]
        return min(start + n, limit)

    def append(self, add: list[int]) -> None:
        """`add[r]` more tokens on rank r: one decoded token (one rank), or a prompt chunk (its
        zigzag shares)."""
        n = sum(add)
        if n == 0:
            return
        start = self.num_tokens
        owner = add.index(1) if n == 1 else -1
        if owner >= 0 and self.segments:
            s, m, o, limit = self.segments[-1]
            if o == owner and s + m == start and limit >= start:
                self.segments[-1] = (s, m + 1, o, start + 1)
                return
        self.segments.append((start, n, owner, start + n))

    def count_below(self, c: int) -> list[int]:
        """Tokens at positions < c on each rank: the length of each rank's shard of [0, c)."""
        counts = [0] * self.world_size
        for start, n, owner, limit in self.segments:
            if start >= c:
                break
            x = min(c, limit, start + n) - start
            if owner >= 0:
                counts[owner] += x
                continue
            for r, (a0, a1, b0, b1) in enumerate(_zigzag_chunks(n, self.world_size)):
                counts[r] += min(max(x - a0, 0), a1 - a0) + min(max(x - b0, 0), b1 - b0)
        return counts

    def truncated(self, c: int) -> ShardMap:
        segments = [(s, n, o, min(limit, c)) for s, n, o, limit in self.segments if s < c]
        return ShardMap(self.world_size, segments)


class PrefixIndex:
    """Holders (sequences, cache entries) by the chain hashes of their computed tokens."""

    def __init__(self) -> None:
        self._by_hash: dict[int, dict[int, None]] = {}  # hash of tokens[:k*GROUP] -> holders
        self._chains: dict[int, list[int]] = {}
        self._tokens: dict[int, list[int]] = {}

    def __contains__(self, holder: int) -> bool:
        return holder in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def published(self, holder: int) -> int:
        return len(self._tokens.get(holder, ()))

    def publish(self, holder: int, tokens: list[int]) -> None:
        """The holder's computed tokens (a list that only grows while the holder lives)."""
        chain = self._chains.setdefault(holder, [])
        self._tokens[holder] = tokens
        h = chain[-1] if chain else 0
        for k in range(len(chain), len(tokens) // GROUP):
            h = hash((h, tuple(tokens[k * GROUP:(k + 1) * GROUP])))
            chain.append(h)
            self._by_hash.setdefault(h, {})[holder] = None

    def remove(self, holder: int) -> None:
        for h in self._chains.pop(holder, []):
            holders = self._by_hash[h]
            holders.pop(holder, None)
            if not holders:
                del self._by_hash[h]
        self._tokens.pop(holder, None)

    def rename(self, old: int, new: int) -> None:
        tokens = self._tokens.get(old)
        self.remove(old)
        if tokens is not None:
            self.publish(new, tokens)

    def longest(self, tokens: list[int], limit: int, candidates: int = 8) -> tuple[int, int] | None:
        """(holder, c): the holder sharing the longest prefix of `tokens`, c <= limit of them
        (at least GROUP), or None."""
        h, level, holders = 0, 0, None
        while (level + 1) * GROUP <= limit:
            h = hash((h, tuple(tokens[level * GROUP:(level + 1) * GROUP])))
            found = self._by_hash.get(h)
            if not found:
                break
            level, holders = level + 1, found
        if holders is None:
            return None
        best = None
        for holder in list(holders)[-candidates:]:  # the latest published last
            theirs = self._tokens[holder]
            c = level * GROUP
            if theirs[:c] != tokens[:c]:  # a hash collision
                continue
            end = min(limit, len(theirs))
            while c < end and theirs[c] == tokens[c]:
                c += 1
            if best is None or c > best[1]:
                best = (holder, c)
        return best


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (binary search on slices: C-speed compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
