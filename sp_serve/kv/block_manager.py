"""The engine's view of KV memory on every rank: pure accounting, no tensors.

For each rank it runs the same `BlockPool` the rank's PagedKVCache runs, on the same operations,
so the two never disagree on counts (and a plan never carries block ids). The ranks do a step's
frees, renames and shares (`ops`, in the engine's order) before its appends; appends only take
blocks, so doing them last never runs a rank short where the engine was not. Admission asks
`can_hold` for every rank; decode placement picks the rank that keeps the sequence's shards
balanced. Operations the ranks must mirror besides a step's appends (frees, renames, shared
prefixes) are logged in `ops`, in order, and ride on the next plan.

Prefix caching (`enable_prefix_caching`): a finished sequence's KV is not freed but renamed to a
cache entry (a holder like a sequence, LRU-ordered); a new prompt starting with tokens a holder
has computed (a cache entry or a live sequence) shares them (`share`), see kv/prefix_cache.py.
A block is *live* while a sequence holds it; a block only cache entries hold is *reclaimable*
and counts as free: `allocate` evicts entries, least recently used first, until the blocks it
needs are free. A live block is never evicted.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

from sp_serve.attention.zigzag import ZigzagLayout
from sp_serve.kv.cache import BlockPool
from sp_serve.kv.prefix_cache import GROUP, PrefixIndex, ShardMap

# Cache entries' ids: apart from sequence ids (which count up from 0; profile runs use -1, -2..).
CACHE_ID_BASE = 1 << 48


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockManager:
    def __init__(self, world_size: int, blocks_per_rank: int, block_size: int,
                 enable_prefix_caching: bool = False, host_blocks_per_rank: int = 0):
        self.world_size = world_size
        self.blocks_per_rank = blocks_per_rank
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [BlockPool(blocks_per_rank, block_size) for _ in range(world_size)]
        # Swap to host (--kv-offloading-size): each rank's host pool, mirrored like its device
        # pool; a swapped-out sequence holds host blocks only, its tokens per rank kept here.
        self.host_blocks_per_rank = host_blocks_per_rank
        self.host_pools = [BlockPool(host_blocks_per_rank, block_size) for _ in range(world_size)]
        self.swapped: dict[int, list[int]] = {}  # seq_id -> tokens per rank, on the host
        self.num_swapped_out = 0  # sequences copied to the host (cumulative)
        self.num_swapped_in = 0  # ... and back
        self.swapped_out_blocks = 0  # device blocks' worth of KV copied out, over all ranks
        self.swapped_in_blocks = 0
        self._live = [[0] * blocks_per_rank for _ in range(world_size)]  # sequences holding it
        self._reclaimable = [0] * world_size  # blocks held by cache entries only
        self.tokens: dict[int, list[int]] = {}  # seq_id -> tokens stored per rank (sequences)
        self.shards: dict[int, ShardMap] = {}  # every holder's placement (prefix caching only)
        self.entries: OrderedDict[int, None] = OrderedDict()  # cache entries, least recent first
        self.index = PrefixIndex()
        self.ops: list[tuple] = []  # for the ranks, in order: ("free", id), ("rename", old, new),
        # ("share", dst, src, tokens per rank)
        self._entry_ids = itertools.count(CACHE_ID_BASE)
        self._pinned: int | None = None
        self.prefix_cache_queries = 0  # prompt tokens looked up (vLLM counts tokens)
        self.prefix_cache_hits = 0  # of those, found cached

    @property
    def free_blocks(self) -> list[int]:
        """Blocks each rank can hand out: free, or held by cache entries only."""
        return [p.num_free_blocks + c for p, c in zip(self.pools, self._reclaimable)]

    def take_ops(self) -> list[tuple]:
        ops, self.ops = self.ops, []
        return ops

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
        self._evict_for(need)
        have = self.tokens.setdefault(seq_id, [0] * self.world_size)
        for r, a in enumerate(add):
            if a:
                before = len(self.pools[r].table(seq_id))
                table, _, _ = self.pools[r].append(seq_id, a)
                for block in table[before:]:
                    self._live[r][block] = 1
                have[r] += a
        if self.enable_prefix_caching:
            self.shards.setdefault(seq_id, ShardMap(self.world_size)).append(add)

    def free(self, seq_id: int, computed: list[int] | None = None) -> None:
        """The sequence is done with its KV. With prefix caching and its computed tokens given,
        the KV stays as a cache entry (evicted when memory is needed); else it is freed. A
        swapped-out sequence's host blocks are freed."""
        if seq_id in self.swapped:
            del self.swapped[seq_id]
            for pool in self.host_pools:
                pool.free(seq_id)
            self.shards.pop(seq_id, None)
            self.ops.append(("free", seq_id))
            return
        have = self.tokens.pop(seq_id, None)
        if have is None:
            return
        self.index.remove(seq_id)
        keep = self.enable_prefix_caching and computed
        if keep:
            assert len(computed) == sum(have), "a cache entry must hold exactly its computed tokens"
        for r, pool in enumerate(self.pools):
            live = self._live[r]
            for block in pool.table(seq_id):
                live[block] -= 1
                if live[block] == 0 and (keep or pool.refs[block] > 1):
                    self._reclaimable[r] += 1  # now held by cache entries only
            if not keep:
                pool.free(seq_id)
        if not keep:
            self.shards.pop(seq_id, None)
            self.ops.append(("free", seq_id))
            return
        entry = next(self._entry_ids)
        for pool in self.pools:
            pool.rename(seq_id, entry)
        self.shards[entry] = self.shards.pop(seq_id)
        self.entries[entry] = None
        self.index.publish(entry, list(computed))
        self.ops.append(("rename", seq_id, entry))
        # entries holding only shared blocks cost no memory: bound their number all the same
        while len(self.entries) > self.world_size * self.blocks_per_rank:
            self._evict(next(iter(self.entries)))

    # ---- swap to host ----------------------------------------------------------------------
    def can_swap_out(self, seq_id: int) -> bool:
        """Whether every rank's host pool has room for the sequence's shard."""
        have = self.tokens.get(seq_id)
        return have is not None and all(
            _blocks(n, self.block_size) <= pool.num_free_blocks
            for n, pool in zip(have, self.host_pools))

    def swap_out(self, seq_id: int) -> None:
        """The sequence's shards go to the host pools (each rank copies its own; the ranks see
        ("swap_out", id)) and its device blocks are released, as `free` releases them."""
        assert self.can_swap_out(seq_id)
        have = self.tokens[seq_id]
        for n, pool in zip(have, self.host_pools):
            pool.append(seq_id, n)
        self.index.remove(seq_id)  # no longer shareable until it is back
        for r, pool in enumerate(self.pools):
            live = self._live[r]
            for block in pool.table(seq_id):
                live[block] -= 1
                if live[block] == 0 and pool.refs[block] > 1:
                    self._reclaimable[r] += 1
            self.swapped_out_blocks += len(pool.table(seq_id))
            pool.free(seq_id)
        del self.tokens[seq_id]
        self.swapped[seq_id] = have
        self.num_swapped_out += 1
        self.ops.append(("swap_out", seq_id))

    def swap_in_blocks(self, seq_id: int) -> list[int]:
        """Device blocks per rank that bringing the swapped sequence back takes."""
        return [_blocks(n, self.block_size) for n in self.swapped[seq_id]]

    def swap_in(self, seq_id: int) -> None:
        """Brings a swapped sequence back: fresh device blocks (the lowest free, as a prompt
        takes them) receive its shards from the host pools ("swap_in" on the ranks)."""
        need = self.swap_in_blocks(seq_id)
        assert all(n <= f for n, f in zip(need, self.free_blocks)), "swap_in without room"
        self._evict_for(need)
        have = self.swapped.pop(seq_id)
        for r, (n, pool) in enumerate(zip(have, self.pools)):
            table, _, _ = pool.append(seq_id, n)
            for block in table:
                self._live[r][block] = 1
            self.swapped_in_blocks += len(table)
            self.host_pools[r].free(seq_id)
        self.tokens[seq_id] = list(have)
        self.num_swapped_in += 1
        self.ops.append(("swap_in", seq_id))

    def _evict(self, entry: int) -> None:
        del self.entries[entry]
        self.index.remove(entry)
        self.shards.pop(entry, None)
        for r, pool in enumerate(self.pools):
            self._reclaimable[r] -= len(pool.free(entry))
        self.ops.append(("free", entry))

    def _evict_for(self, need: list[int]) -> None:
        """Evicts cache entries, least recently used first, until each rank has need[r] free."""
        while any(p.num_free_blocks < n for p, n in zip(self.pools, need)):
            victim = next((e for e in self.entries if e != self._pinned), None)
            assert victim is not None, "no cache entry left to evict: can_hold was not asked"
            self._evict(victim)

    def evict_all(self) -> None:
        for entry in list(self.entries):
            self._evict(entry)

    # ---- prefix caching ------------------------------------------------------------------
    def publish(self, seq_id: int, num_computed: int, tokens) -> None:
        """A live sequence has computed its first num_computed tokens (`tokens()` returns at
        least those): later prompts may share them. Cheap when no new group is complete."""
        if not self.enable_prefix_caching or seq_id not in self.tokens:
            return
        if num_computed // GROUP > self.index.published(seq_id) // GROUP:
            self.index.publish(seq_id, tokens()[:num_computed])

    def match(self, prompt: list[int]) -> tuple[int, int] | None:
        """(holder, c): the cached prefix of the prompt to reuse, at most all but its last token
        (which must be computed for the first output's logits)."""
        if not self.enable_prefix_caching:
            return None
        return self.index.longest(prompt, len(prompt) - 1)

    def share_cost(self, holder: int, c: int, rest: list[int], reserve: list[int]
                   ) -> list[int] | None:
        """Per-rank token counts of the prefix when sharing c tokens of the holder and then
        storing `rest[r]` more tokens still leaves `reserve[r]` free on every rank; else None."""
        lens = self.shards[holder].count_below(c)
        for r, pool in enumerate(self.pools):
            table, live = pool.table(holder), self._live[r]
            full, part = divmod(lens[r], self.block_size)
            tail = int(part > 0)
            revived = sum(1 for b in table[:full] if live[b] == 0)  # reclaimable, then live
            only_holder = sum(1 for b in table if live[b] == 0)  # freed only by evicting it
            extra = _blocks(lens[r] + rest[r], self.block_size) - _blocks(lens[r], self.block_size)
            free = pool.num_free_blocks + self._reclaimable[r]
            if tail > free - only_holder or revived + tail + extra + reserve[r] > free:
                return None
        return lens

    def share(self, seq_id: int, holder: int, c: int, lens: list[int]) -> None:
        """The new sequence starts as the holder's first c tokens (lens[r] on rank r)."""
        assert seq_id not in self.tokens
        self._pinned = holder  # the copy of its last blocks needs them until the share is done
        self._evict_for([int(n % self.block_size > 0) for n in lens])
        self._pinned = None
        for r, pool in enumerate(self.pools):
            live = self._live[r]
            pool.share_prefix(seq_id, holder, lens[r])
            for block in pool.table(seq_id):
                if live[block] == 0 and pool.refs[block] > 1:
                    self._reclaimable[r] -= 1
                live[block] += 1
        self.tokens[seq_id] = list(lens)
        self.shards[seq_id] = self.shards[holder].truncated(c)
        if holder in self.entries:
            self.entries.move_to_end(holder)
        self.ops.append(("share", seq_id, holder, list(lens)))

    # ---- placement -----------------------------------------------------------------------
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
        """Blocks live sequences hold (cache entries' own blocks count as free)."""
        return self.world_size * self.blocks_per_rank - sum(self.free_blocks)

    def usage(self) -> float:
        return self.num_used_blocks() / max(1, self.world_size * self.blocks_per_rank)
