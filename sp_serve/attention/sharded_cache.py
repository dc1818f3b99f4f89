"""Attention of queries to a KV cache that stays sharded where it was computed.

Each rank attends the queries to its own shard only, producing a partial (o, lse) per query and
head; the partials travel (never the KV) and are merged by log-sum-exp. Traffic is
O(queries x heads x head_dim) per layer, independent of the context length.

Two shapes of use:
  - decode: every rank has every query (dense layers run replicated for the small batch), so
    partials are all-gathered and every rank merges all of them. Where collectives run in the
    background (NCCL, gloo) the batch is split into micro-batches: while one micro-batch's
    partials travel, the next one attends; on shared memory one round is cheaper.
  - a prompt chunk after earlier chunks (chunked prefill): each rank has its own zigzag queries;
    queries are all-gathered, every rank attends all of them to its shard, and an all-to-all
    returns to each rank the partials of its own queries.
A rank whose shard is empty for a sequence contributes lse = -inf, which the merge weighs 0.

A decode partial over this rank's shards (`DecodeShards`): on the triton backend, and on CUDA
whatever the prefill backend, one split-KV kernel launch per micro-batch reads the paged pool in
place; the torch backend on CPU attends the whole batch in a few ops per layer
(attention/batched_decode.py: the shards cut into pieces of whole blocks, pieces of similar
length gathered into groups, one masked attention call per group, pieces merged by lse).

Legend: b batch (one query per sequence), t tokens, h q heads, d head_dim, n ranks,
m blocks of the longest block table;
a partial is packed as o (d values) followed by lse (1 value): the last dim is d+1.
"""
from __future__ import annotations

from typing import Callable

import torch

from sp_serve.attention.batched_decode import BatchedDecodeShards
from sp_serve.attention.merge import merge_partials
from sp_serve.kv.cache import PagedKVCache
from sp_serve.parallel.groups import ParallelContext

# (rows) -> packed partial [len(rows), h, d+1] fp32 over this rank's shard
LocalPartialFn = Callable[[slice], torch.Tensor]


def pack_partial(o_thd: torch.Tensor, lse_th: torch.Tensor) -> torch.Tensor:
    return torch.cat([o_thd.float(), lse_th.unsqueeze(-1)], dim=-1)


def merge_packed(parts_nthe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return merge_partials(parts_nthe[..., :-1], parts_nthe[..., -1])


# Block-table rows are padded to a multiple of this many blocks: the kernel's row stride is then
# always a multiple of 16 and each row 64-byte aligned, so Triton specializes it one way only.
TABLE_WIDTH_MULTIPLE = 16


def paged_decode_supported(backend: str, device: torch.device) -> bool:
    """Decode reads the paged pool in place (the Triton split-KV kernel) on the triton backend,
    and on CUDA whatever the prefill backend (flash-attn, torch) when Triton can run: the
    batched torch path copies every shard's blocks each layer."""
    if backend == "triton":
        return True
    if device.type != "cuda":
        return False
    from sp_serve_kernels import triton_available
    return triton_available()


class DecodeShards:
    """This rank's shards of one decode step's sequences, attended to layer after layer.

    Built once per step, after the step's new slots are appended: the paged kernel's block
    tables and lengths (or the torch path's layout of pieces and groups) are the same for
    every layer.
    paged: read the pool in place with the Triton kernel (`paged_decode_supported`); tables:
    the step's (block tables, lengths) already on the device (the worker copies a step's
    metadata in one transfer), else built here.
    """

    def __init__(self, kv: PagedKVCache, seq_ids: list[int], scale: float, backend: str,
                 paged: bool | None = None,
                 tables: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.kv, self.scale, self.backend = kv, scale, backend
        self.paged = paged_decode_supported(backend, kv.device) if paged is None else paged
        if self.paged:
            self.tables_bm, self.lens_b = tables if tables is not None else kv.block_tables(
                seq_ids, width_multiple=TABLE_WIDTH_MULTIPLE)
        else:
            # The whole batch's layout, now: with shared-memory collectives (CPU) and on one
            # rank, decode attends all rows at once. A micro-batch's rows (collectives that
            # overlap: gloo, NCCL) get theirs when first asked, at the step's first layer.
            self.seq_ids = seq_ids
            self._batched = {(0, len(seq_ids)): BatchedDecodeShards(kv, seq_ids)}

    def partial(self, layer: int, q_bhd: torch.Tensor, rows: slice) -> torch.Tensor:
        """Packed partial [len(rows), h, d+1] fp32 of q_bhd[rows] over this rank's shards."""
        if not self.paged:
            shards = self._batched.get((rows.start, rows.stop))
            if shards is None:
                shards = self._batched[(rows.start, rows.stop)] = BatchedDecodeShards(
                    self.kv, self.seq_ids[rows])
            return shards.partial(layer, q_bhd[rows], self.scale)
        from sp_serve_kernels import paged_decode_attention
        q_bhd = q_bhd[rows]
        # The kernel writes o and lse straight into the packed layout (o in fp32, no cat);
        # a sequence with nothing on this rank (length 0) gets o = 0, lse = -inf.
        part_bhe = torch.empty((*q_bhd.shape[:-1], q_bhd.shape[-1] + 1), dtype=torch.float32,
                               device=q_bhd.device)
        paged_decode_attention(q_bhd, *self.kv.pages(layer), self.tables_bm[rows],
                               self.lens_b[rows], self.scale,
                               out=part_bhe[..., :-1], lse_out=part_bhe[..., -1],
                               kv_scales=self.kv.scale_pages(layer))
        return part_bhe


def decode_over_shards(
    pc: ParallelContext, batch: int, local_partial: LocalPartialFn, num_micro_batches: int = 2
) -> torch.Tensor:
    """Merged attention output [b, h, d] fp32 for queries every rank holds."""
    if pc.sp_size == 1:
        return merge_packed(local_partial(slice(0, batch))[None])[0]
    in_flight = []
    for rows in _split(batch, num_micro_batches if pc.comm.overlaps else 1):
        part_the = local_partial(rows)
        in_flight.append((pc.comm.all_gather_start(part_the), part_the.shape))
    outs = []
    for pending, shape in in_flight:
        outs.append(merge_packed(pending.wait().view(pc.sp_size, *shape))[0])
    return torch.cat(outs)


def chunk_over_shards(
    pc: ParallelContext,
    q_thd: torch.Tensor,
    num_q_per_rank: list[int],
    local_partial_for: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial (o, lse) of this rank's queries over every rank's shard of the cached context.

    local_partial_for(q_thd) attends any queries to this rank's shard -> packed [t, h, d+1].
    """
    if pc.sp_size == 1:
        return merge_packed(local_partial_for(q_thd)[None])
    width = max(num_q_per_rank)
    padded = q_thd
    if q_thd.shape[0] < width:
        padded = torch.zeros((width, *q_thd.shape[1:]), dtype=q_thd.dtype, device=q_thd.device)
        padded[: q_thd.shape[0]] = q_thd
    all_q = pc.comm.all_gather(padded)
    mine_nthe = local_partial_for(all_q).view(pc.sp_size * width, *q_thd.shape[1:-1], -1)
    theirs_nthe = pc.comm.all_to_all(mine_nthe).view(pc.sp_size, width, *q_thd.shape[1:-1], -1)
    return merge_packed(theirs_nthe[:, : q_thd.shape[0]])


def _split(n: int, parts: int) -> list[slice]:
    parts = max(1, min(parts, n))
    step = -(-n // parts)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]
