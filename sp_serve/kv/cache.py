"""One rank's paged KV pool and its local block tables.

The engine decides how many of a sequence's tokens each rank stores (zigzag share of a prompt,
balanced placement of decoded tokens); which physical block holds them is decided here, by a
deterministic allocator whose block counts the engine's BlockManager mirrors exactly, so a step
plan never carries block ids and allocation here cannot fail where the engine admitted.

A shard is a bag of tokens: decode and later prompt chunks attend to all of it without a mask,
so the order of tokens inside a rank's shard does not matter for attention. It is appended in
position order, though (a chunk's zigzag share in increasing positions, then later chunks and
decoded tokens), so the tokens of any prefix of a sequence are a prefix of each rank's shard:
that is what prefix caching shares (`BlockPool.share_prefix`).

Legend: l layers, n blocks, s block_size (slots), h kv heads, d head_dim, t tokens,
b sequences, m blocks of the longest block table.
"""
from __future__ import annotations

import heapq
from contextlib import AbstractContextManager

import torch

from sp_serve.kv.quant import SCALE_DTYPE, bytes_to_float_, dequantize, kv_format, quantize


class BlockPool:
    """One rank's blocks without tensors: a min-heap free list, a reference count per block, and
    each holder's block table and length. A holder is a sequence or a prefix-cache entry (the
    KV a finished sequence left behind); holders share the full blocks of a common prefix.

    The ranks' PagedKVCache and the engine's BlockManager (one per rank) run this same code on
    the same operations in the same order, so their block counts agree exactly."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Prompt chunks take the lowest free blocks, decode growth the highest: a prompt
        # prefilled in chunks between decode steps stays consecutive (one run, read in place)
        # instead of being cut by every decode tail's new block, and this holds after others
        # came and went. Two heaps with lazy deletion: an entry counts only while its block is
        # free (a block taken from one heap leaves a stale entry in the other).
        self.refs = [0] * num_blocks  # 0: free
        self._num_free = num_blocks
        self._low = list(range(num_blocks))  # min-heap of ids
        self._high = [-b for b in range(num_blocks - 1, -1, -1)]  # min-heap of -ids
        self._tables: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def free_block_ids(self) -> list[int]:
        return [b for b, n in enumerate(self.refs) if n == 0]

    def num_tokens(self, seq_id: int) -> int:
        return self._lens.get(seq_id, 0)

    def table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def holders(self) -> list[int]:
        return list(self._tables)

    def _take(self, highest: bool = False) -> int:
        assert self._num_free, "KV pool exhausted: the engine admitted more than this rank holds"
        heap, sign = (self._high, -1) if highest else (self._low, 1)
        while self.refs[sign * heap[0]]:
            heapq.heappop(heap)  # stale: taken through the other heap
        block = sign * heapq.heappop(heap)
        self.refs[block] = 1
        self._num_free -= 1
        return block

    def _drop(self, block: int) -> bool:
        """One reference fewer; True when the block became free."""
        assert self.refs[block] > 0, f"block {block} freed twice"
        self.refs[block] -= 1
        if self.refs[block]:
            return False
        self._num_free += 1
        if len(self._low) + len(self._high) > 4 * self.num_blocks:  # stale entries: rebuild
            self._low = self.free_block_ids()
            self._high = [-b for b in reversed(self._low)]
        else:
            heapq.heappush(self._low, block)
            heapq.heappush(self._high, -block)
        return True

    def append(self, seq_id: int, count: int, decode: bool = False) -> tuple[list[int], int, int]:
        """Reserves `count` slots at the end of the holder's shard: (table, start, end). New
        blocks are the lowest free ones for a prompt chunk, the highest for decode tokens."""
        table = self._tables.setdefault(seq_id, [])
        start = self._lens.get(seq_id, 0)
        end = start + count
        assert not (start % self.block_size and count and self.refs[table[-1]] > 1), \
            "append into a shared block"
        while len(table) * self.block_size < end:
            table.append(self._take(highest=decode))
        self._lens[seq_id] = end
        return table, start, end

    def share_prefix(self, dst: int, src: int, length: int) -> tuple[int, int, int] | None:
        """dst (new, empty) starts as the first `length` tokens of src's shard: it shares src's
        full blocks, and gets its own copy of a partly used last block (which src may still
        append to). Returns (src block, dst block, tokens) for that copy, or None."""
        assert dst not in self._tables, "a shared prefix for a sequence that holds KV already"
        src_table = self._tables.get(src, [])
        assert length <= self._lens.get(src, 0)
        full, rest = divmod(length, self.block_size)
        table = src_table[:full]
        for block in table:
            self.refs[block] += 1
        copy = None
        if rest:
            copy = (src_table[full], self._take(), rest)
            table = table + [copy[1]]
        self._tables[dst] = table
        self._lens[dst] = length
        return copy

    def rename(self, old: int, new: int) -> None:
        assert new not in self._tables
        if old in self._tables:
            self._tables[new] = self._tables.pop(old)
            self._lens[new] = self._lens.pop(old)

    def free(self, seq_id: int) -> list[int]:
        """Drops the holder; returns the blocks that became free."""
        freed = [b for b in self._tables.pop(seq_id, []) if self._drop(b)]
        self._lens.pop(seq_id, None)
        return freed


class SwapStreams:
    """Where a CUDA cache's swap copies run: a side stream of their own, ordered against the
    compute stream (the device's current stream, which runs the steps) by events. The cache
    calls these four methods only; a test passes a fake with the same four (tests/test_swap.py).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)

    def side_waits_for_compute(self) -> None:
        """The side stream's next copies run after all the work queued on the compute stream."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))

    def on_side(self) -> AbstractContextManager:
        return torch.cuda.stream(self.side)

    def record(self):
        """An event that completes when the side stream's copies queued so far have."""
        return self.side.record_event()

    def compute_waits_for(self, event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


class PagedKVCache:
    """K and V of one rank's shards, [l, n*s, h, d] each, in the model's dtype (`dtype`) or,
    with a quantized --kv-cache-dtype, one byte per element plus a scale per (token, KV head)
    in `k_scale_lth`/`v_scale_lth` [l, n*s, h] (kv/quant.py). Writes quantize; every read
    (`read_runs`, `read_pieces`, `read_blocks`, `read`) returns dequantized K/V in `dtype`; the
    paged decode kernel reads `pages` and `scale_pages` in place."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 kv_cache_dtype: str = "auto", host_blocks: int = 0,
                 swap_streams: SwapStreams | None = None):
        self.fmt = kv_format(kv_cache_dtype)
        self.kv_cache_dtype = kv_cache_dtype
        self.dtype = dtype  # what attention computes in: the model's dtype
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        storage = dtype if self.fmt is None else self.fmt.storage
        # Flat slot layout [l, n*s, h, d]: slot = block * s + offset. torch.empty on CPU commits
        # pages only when written, so an idle pool costs no resident memory.
        self.k_lthd = torch.empty(shape, dtype=storage, device=device)
        self.v_lthd = torch.empty(shape, dtype=storage, device=device)
        self.k_scale_lth = self.v_scale_lth = None
        if self.fmt is not None:
            self.k_scale_lth = torch.empty(shape[:3], dtype=SCALE_DTYPE, device=device)
            self.v_scale_lth = torch.empty(shape[:3], dtype=SCALE_DTYPE, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.pool = BlockPool(num_blocks, block_size)
        self._tables = self.pool._tables  # read-only views of the pool's tables and lengths
        self._lens = self.pool._lens
        # The host pool for swapped-out shards (--kv-offloading-size): one tensor per per-slot
        # tensor, block-major [host_blocks, l, s*...] (a host block is contiguous, so a run of
        # host blocks is one plain copy), in host memory (pinned on CUDA, for async DMA).
        self.host_pool = BlockPool(host_blocks, block_size)
        self._host: list[torch.Tensor] = []
        self._scratch_bufs: dict[str, torch.Tensor] = {}  # `read_blocks`' gathers, reused
        if host_blocks:
            pin = self.device.type == "cuda"
            self._host = [torch.empty((host_blocks, *self._by_block(t).shape[1:]),
                                      dtype=self._by_block(t).dtype, pin_memory=pin)
                          for t in self._tensors()]
        # CUDA: swap copies on a side stream (SwapStreams); None: synchronous (CPU).
        if swap_streams is None and host_blocks and self.device.type == "cuda":
            swap_streams = SwapStreams(self.device)
        self._streams = swap_streams
        self._swap_done = None  # the event of side-stream copies the compute stream has not
        # waited for yet

    @property
    def quantized(self) -> bool:
        return self.fmt is not None

    @property
    def device(self) -> torch.device:
        return self.k_lthd.device

    def _tensors(self) -> list[torch.Tensor]:
        """Every per-slot tensor of the pool ([l, n*s, ...]): K, V, and their scales."""
        out = [self.k_lthd, self.v_lthd]
        if self.fmt is not None:
            out += [self.k_scale_lth, self.v_scale_lth]
        return out

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_tokens(self, seq_id: int) -> int:
        return self.pool.num_tokens(seq_id)

    def append_slots(self, seq_id: int, count: int, decode: bool = False,
                     host: bool = False) -> torch.Tensor:
        """Reserves `count` slots at the end of the sequence's shard; returns their slot ids (on
        the host with host=True: the worker copies a whole step's metadata to the device once).
        Prompt chunks get the lowest free blocks, decode tokens (decode=True) the highest."""
        slots = self._slots(*self.pool.append(seq_id, count, decode))
        return slots if host else slots.to(self.device)

    def apply(self, ops: list[tuple], rank: int) -> None:
        """The engine's KV operations of a step, in the engine's order (`BlockManager.ops`):
        ("free", id), ("swap_out", id), ("swap_in", id), ("rename", old id, new id),
        ("share", dst, src, [tokens per rank]). A shared prefix copies the partly used last
        block's slots, every layer, before the step writes anything. On CUDA the swaps' copies
        run on the side stream, and the compute stream waits for them before it touches the
        pool again: before a share's copy, and at the end, before the step's appends, writes
        and reads (see `_swap_copy`)."""
        for op in ops:
            if op[0] == "free":
                self.free(op[1])
            elif op[0] == "swap_out":
                self.swap_out(op[1])
            elif op[0] == "swap_in":
                self.swap_in(op[1])
            elif op[0] == "rename":
                self.pool.rename(op[1], op[2])
            else:
                _, dst, src, lens = op
                copy = self.pool.share_prefix(dst, src, lens[rank])
                if copy is not None:
                    self._compute_waits_for_swaps()  # dst may be a block a swap-out freed
                    src_block, dst_block, n = copy
                    a, b = src_block * self.block_size, dst_block * self.block_size
                    for t in self._tensors():
                        t[:, b:b + n] = t[:, a:a + n]
        self._compute_waits_for_swaps()

    def slots(self, seq_id: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = self._lens.get(seq_id, 0) if end is None else end
        return self._slots(self._tables.get(seq_id, []), start, end).to(self.device)

    def _slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids of tokens [start, end) of a shard, on the host."""
        idx = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[idx // self.block_size] if end > start else idx
        return blocks * self.block_size + idx % self.block_size

    def write(self, layer: int, slots_t: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor,
              rows_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k/v[rows] (all rows if rows_t is None) at the slots. Returns k and v (all rows)
        as attention must see them: as given, or, quantized, dequantized from what is stored,
        so that fresh tokens (the ring) read exactly what later readers of the cache read."""
        if self.fmt is None:
            pick = (lambda x: x) if rows_t is None else (lambda x: x[rows_t])
            self.k_lthd[layer].index_copy_(0, slots_t, pick(k_thd).to(self.k_lthd.dtype))
            self.v_lthd[layer].index_copy_(0, slots_t, pick(v_thd).to(self.v_lthd.dtype))
            return k_thd, v_thd
        out = []
        for x_thd, pool_lthd, scale_lth in ((k_thd, self.k_lthd, self.k_scale_lth),
                                            (v_thd, self.v_lthd, self.v_scale_lth)):
            q_thd, scale_th = quantize(x_thd, self.fmt)
            q_w, s_w = (q_thd, scale_th) if rows_t is None else (q_thd[rows_t], scale_th[rows_t])
            # index_copy_ has no float8 kernel on CPU: copy the bytes (same element size)
            pool_lthd[layer].view(torch.uint8).index_copy_(0, slots_t, q_w.view(torch.uint8))
            scale_lth[layer].index_copy_(0, slots_t, s_w)
            out.append(dequantize(q_thd, scale_th, x_thd.dtype))
        return out[0], out[1]

    def _dequant(self, layer: int, k_thd: torch.Tensor, v_thd: torch.Tensor, index
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v read from the pool at `index` (a slice or slot ids) in the model's dtype."""
        if self.fmt is None:
            return k_thd, v_thd
        if isinstance(index, torch.Tensor):
            ks, vs = (s[layer].index_select(0, index) for s in (self.k_scale_lth, self.v_scale_lth))
        else:
            ks, vs = self.k_scale_lth[layer][index], self.v_scale_lth[layer][index]
        return dequantize(k_thd, ks, self.dtype), dequantize(v_thd, vs, self.dtype)

    def read(self, layer: int, slots_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k_lthd[layer], self.v_lthd[layer]
        if self.fmt is not None:
            k, v = k.view(torch.uint8), v.view(torch.uint8)
        k, v = k.index_select(0, slots_t), v.index_select(0, slots_t)
        if self.fmt is not None:
            k, v = k.view(self.fmt.storage), v.view(self.fmt.storage)
        return self._dequant(layer, k, v, slots_t)

    def runs(self, seq_id: int, end: int | None = None) -> list[tuple[int, int]]:
        """The first `end` tokens of the shard (default all) as [start, stop) slot ranges, one per
        run of consecutive blocks. A sequence allocated on a quiet pool is one run: its shard
        is then a view of the pool (see `read_runs`), not a copy made every layer."""
        table = self._tables.get(seq_id, [])
        end = self._lens.get(seq_id, 0) if end is None else end
        out: list[tuple[int, int]] = []
        for i in range(-(-end // self.block_size)):
            start = table[i] * self.block_size
            stop = start + min(self.block_size, end - i * self.block_size)
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], stop)
            else:
                out.append((start, stop))
        return out

    def read_runs(self, layer: int, runs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given slot runs, [t, h, d] in the model's dtype: views when there is
        one run and the pool is not quantized."""
        k_thd, v_thd = self.k_lthd[layer], self.v_lthd[layer]
        if len(runs) == 1:
            (a, b), = runs
            return self._dequant(layer, k_thd[a:b], v_thd[a:b], slice(a, b))
        if not runs:
            return self._dequant(layer, k_thd[:0], v_thd[:0], slice(0, 0))
        def cat(x: torch.Tensor) -> torch.Tensor:  # float8 as bytes: no CPU cat kernel
            flat = x.view(torch.uint8) if x.element_size() == 1 else x
            return torch.cat([flat[a:b] for a, b in runs]).view(x.dtype)

        if self.fmt is None:
            return cat(k_thd), cat(v_thd)
        ks, vs = cat(self.k_scale_lth[layer]), cat(self.v_scale_lth[layer])
        return dequantize(cat(k_thd), ks, self.dtype), dequantize(cat(v_thd), vs, self.dtype)

    def read_pieces(self, layer: int, runs: list[tuple[int, int]]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K and V of the given slot runs as at most two pieces [t, h, d] whose union is the
        shard (attention over them is merged by lse, so order does not matter): the longest run
        as a view of the pool, and the other runs copied together. A shard whose blocks were
        interleaved with other sequences' (a prompt chunked between decode steps, a decode
        tail) then costs a copy of its short fragments each layer, not of all of it."""
        if len(runs) <= 1:
            return [self.read_runs(layer, runs)]
        longest = max(range(len(runs)), key=lambda i: runs[i][1] - runs[i][0])
        rest = runs[:longest] + runs[longest + 1:]
        return [self.read_runs(layer, [runs[longest]]), self.read_runs(layer, rest)]

    def read_blocks(self, layer: int, blocks_t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks (int64 ids on the cache's device), [len(blocks) * s, h, d] in
        the model's dtype (dequantized on a quantized cache), gathered into this cache's
        scratch buffers: the caller may write into them, and they are valid until the next
        read_blocks. Slots never written hold whatever the memory held.

        Scratch, not a fresh tensor per call: a decode step calls this a few times per layer
        with buffers of up to a few MiB, and fresh ones, freed each time, can cost the
        allocator a page fault per 4 KiB (glibc serves them with mmap, as its threshold
        allows: 3-4x the gather's own time, measured)."""
        k_nshd, v_nshd = self.pages(layer)
        n, (s, h, d) = blocks_t.numel(), k_nshd.shape[1:]
        exact = self.fmt is None or self.dtype in (torch.float32, torch.float64)
        out = []
        for i, x_nshd in enumerate((k_nshd, v_nshd)):
            # q x scale in place is exact in float32 (8 bits x a bf16 scale's 8); in bf16/fp16
            # the scale itself would round: there, float32 and then the model's dtype
            o = self._scratch(f"kv{i}", (n, s, h, d), self.dtype if exact else torch.float32)
            if self.fmt is None:
                torch.index_select(x_nshd, 0, blocks_t, out=o)
            else:
                # index_select has no float8 kernel on CPU: gather the bytes
                raw = self._scratch(f"raw{i}", (n, s, h, d), torch.uint8)
                torch.index_select(x_nshd.view(torch.uint8), 0, blocks_t, out=raw)
                bytes_to_float_(o, raw, self.fmt, self._scratch("index", raw.shape, torch.int32))
                scale_nsh = self.scale_pages(layer)[i].index_select(0, blocks_t)
                o.mul_(scale_nsh.to(o.dtype).unsqueeze(-1))
            out.append(o.view(n * s, h, d).to(self.dtype))
        return out[0], out[1]

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of shape `shape` of a grow-only buffer kept for reuse."""
        numel = 1
        for n in shape:
            numel *= n
        buf = self._scratch_bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._scratch_bufs[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(shape)

    def pages(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V as [n, s, h, d] views (the paged kernels' layout): no copy.
        Quantized: the stored elements; their scales are `scale_pages`."""
        shape = (self.num_blocks, self.block_size, *self.k_lthd.shape[2:])
        return self.k_lthd[layer].view(shape), self.v_lthd[layer].view(shape)

    def scale_pages(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One layer's K and V scales as [n, s, h] views, or None when not quantized."""
        if self.fmt is None:
            return None
        shape = (self.num_blocks, self.block_size, self.k_lthd.shape[2])
        return self.k_scale_lth[layer].view(shape), self.v_scale_lth[layer].view(shape)

    def block_tables(self, seq_ids: list[int], host: bool = False,
                     width_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables int32 [b, m] and shard lengths int32 [b] on the cache's device (on the
        host with host=True), for the paged decode kernel. Built once per step, not per layer;
        rows are padded with block 0, which the kernel never reads (it stops at the shard's
        length), to a multiple of `width_multiple` blocks (a row stride that Triton specializes
        the same way every step)."""
        tables = [self._tables.get(s, []) for s in seq_ids]
        width = max([1, *map(len, tables)])
        width = -(-width // width_multiple) * width_multiple
        tables_bm = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        lens_b = torch.tensor([self._lens.get(s, 0) for s in seq_ids], dtype=torch.int32)
        if host:
            return tables_bm, lens_b
        return tables_bm.to(self.device), lens_b.to(self.device)

    def free(self, seq_id: int) -> None:
        """Drops the sequence's KV, on the device or (swapped out) on the host."""
        self.pool.free(seq_id)
        self.host_pool.free(seq_id)

    def swap_out(self, seq_id: int) -> None:
        """Copies the sequence's shard (its blocks, every layer: K, V, scales) into host blocks
        (the lowest free of the host pool, as the engine's mirror takes them) and frees its
        device blocks, which this step may hand out again (see `_swap_copy`)."""
        dev_blocks = list(self.pool.table(seq_id))
        host_blocks, _, _ = self.host_pool.append(seq_id, self.num_tokens(seq_id))
        if dev_blocks:
            self._swap_copy(lambda non_blocking: self._copy_out(dev_blocks, host_blocks,
                                                                non_blocking))
        self.pool.free(seq_id)

    def swap_in(self, seq_id: int) -> None:
        """Copies a swapped-out shard back into fresh device blocks (the lowest free) in its
        order, and frees its host blocks: the shard is as it was, at new block ids."""
        host_blocks = list(self.host_pool.table(seq_id))
        dev_blocks = list(self.pool.append(seq_id, self.host_pool.num_tokens(seq_id))[0])
        if host_blocks:
            self._swap_copy(lambda non_blocking: self._copy_in(host_blocks, dev_blocks,
                                                               non_blocking))
        self.host_pool.free(seq_id)

    def _swap_copy(self, copy) -> None:
        """Runs copy(non_blocking). On CPU: at once, synchronously. On CUDA: queued on the side
        stream after all the compute stream's queued work (the last steps' writes and reads of
        the blocks copied out, or of the free blocks a swap-in fills), without blocking the
        host. The compute stream waits for the copies at the end of `apply` (or before a
        share's copy in it): after a step's KV operations and before its first append, write
        or read, so a block a swap-out freed is written again, and a swapped-in shard is read,
        only once the copy is done. Host blocks are only ever touched by the side stream, so a
        host block freed by a swap-in and taken again by a later swap-out is overwritten only
        after the swap-in's copy has read it (one stream runs in order)."""
        if self._streams is None:
            copy(False)
            return
        self._streams.side_waits_for_compute()
        with self._streams.on_side():
            copy(True)
        self._swap_done = self._streams.record()

    def _compute_waits_for_swaps(self) -> None:
        if self._swap_done is not None:
            self._streams.compute_waits_for(self._swap_done)
            self._swap_done = None

    def _by_block(self, t: torch.Tensor) -> torch.Tensor:
        """A per-slot tensor [l, n*s, ...] as [n, l, s*...], a view (float8 as bytes: CPU
        index kernels have no float8 build)."""
        if t.element_size() == 1:
            t = t.view(torch.uint8)
        return t.view(t.shape[0], t.shape[1] // self.block_size, -1).transpose(0, 1)

    def _copy_out(self, dev_blocks: list[int], host_blocks: list[int], non_blocking: bool) -> None:
        idx = torch.tensor(dev_blocks, dtype=torch.long).to(self.device, non_blocking=non_blocking)
        for t, host in zip(self._tensors(), self._host):
            rows = self._by_block(t).index_select(0, idx)  # [blocks, l, s*...], contiguous
            for a, b, i in _runs(host_blocks):
                host[a:b].copy_(rows[i:i + b - a], non_blocking=non_blocking)

    def _copy_in(self, host_blocks: list[int], dev_blocks: list[int], non_blocking: bool) -> None:
        idx = torch.tensor(dev_blocks, dtype=torch.long).to(self.device, non_blocking=non_blocking)
        for t, host in zip(self._tensors(), self._host):
            rows = torch.empty((len(dev_blocks), *host.shape[1:]), dtype=host.dtype,
                               device=self.device)
            for a, b, i in _runs(host_blocks):
                rows[i:i + b - a].copy_(host[a:b], non_blocking=non_blocking)
            self._by_block(t).index_copy_(0, idx, rows)

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._tables.get(seq_id, []))


def _runs(blocks: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive block ids: (first, end, index of first in `blocks`)."""
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(blocks):
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1, out[-1][2])
        else:
            out.append((b, b + 1, i))
    return out
