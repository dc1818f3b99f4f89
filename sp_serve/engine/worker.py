"""The worker: the only code that touches a device. One per rank; every rank runs the same
StepPlan. Rank 0 gets back float32 logits for the sequences that sample this step.

Prefill chunk on rank r: its zigzag share of the chunk's tokens at their global positions; K/V
written to this rank's cache; attention = zigzag ring over the chunk's fresh K/V, plus (for a
chunk after earlier chunks) the queries' attention to every rank's cached shard in place.
Decode: dense layers run replicated for the batch; each token's K/V is stored on one rank only
(the engine's placement); attention is each rank's partial over its shard, merged by lse. On
the triton backend that partial is one paged split-KV kernel launch per micro-batch, reading the
pool in place; other backends gather each sequence's shard first.

Legend: t tokens, h heads, d head_dim, b batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sp_serve.attention.local import attention_with_lse
from sp_serve.attention.ring_prefill import ring_prefill_attention
from sp_serve.attention.sharded_cache import (
    DecodeShards,
    chunk_over_shards,
    decode_over_shards,
    pack_partial,
)
from sp_serve.attention.zigzag import ZigzagLayout
from sp_serve.engine.plan import DecodeToken, PrefillChunk, StepPlan
from sp_serve.kv.cache import PagedKVCache
from sp_serve.parallel.groups import ParallelContext


class Worker:
    def __init__(self, pc: ParallelContext, model, spec, kv: PagedKVCache, backend: str = "torch"):
        self.pc, self.model, self.spec, self.kv = pc, model, spec, kv
        self.scale = spec.softmax_scale
        self.backend = backend

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """Runs one step; returns {seq_id: logits [vocab] fp32} on rank 0 (empty elsewhere)."""
        for seq_id in plan.free_seq_ids:
            self.kv.free(seq_id)
        logits: dict[int, torch.Tensor] = {}
        for chunk in plan.prefill:
            row = self._prefill(chunk)
            if row is not None:
                logits[chunk.seq_id] = row
        if plan.decode:
            rows = self._decode(plan.decode)
            if rows is not None:
                logits.update({tok.seq_id: rows[i] for i, tok in enumerate(plan.decode)})
        return logits

    def _prefill(self, chunk: PrefillChunk) -> torch.Tensor | None:
        pc, dev = self.pc, self.pc.device
        n = len(chunk.token_ids)
        layout = ZigzagLayout(n, pc.world_size)
        local_idx = layout.local_indices(pc.rank)
        ids_t = torch.tensor(chunk.token_ids, dtype=torch.long)[local_idx].to(dev)
        pos_t = (local_idx + chunk.start_pos).to(dev)
        rope_len_t = torch.full_like(pos_t, max(chunk.total_len, chunk.start_pos + n))
        cached_slots = self.kv.slots(chunk.seq_id)  # earlier chunks' tokens on this rank
        new_slots = self.kv.append_slots(chunk.seq_id, len(local_idx))
        q_per_rank = [layout.num_local(r) for r in range(pc.world_size)]

        def attn(layer: int, q_thd, k_thd, v_thd):
            self.kv.write(layer, new_slots, k_thd, v_thd)
            acc = ring_prefill_attention(pc, layout, q_thd, k_thd, v_thd, self.scale, self.backend)
            if chunk.start_pos > 0:
                k_cache, v_cache = self.kv.read(layer, cached_slots)

                def local_partial_for(qq_thd):
                    return pack_partial(*attention_with_lse(qq_thd, k_cache, v_cache, False, self.scale,
                                                            self.backend))

                o, lse = chunk_over_shards(pc, q_thd, q_per_rank, local_partial_for)
                acc.add(slice(None), o, lse)
            return acc.o_thd.to(q_thd.dtype)

        hidden_td = self.model(ids_t, pos_t, attn, rope_len_t)
        if not chunk.want_logits:
            return None
        owner = layout.owner_of(n - 1)
        last_d = torch.empty(hidden_td.shape[-1], dtype=hidden_td.dtype, device=dev)
        if pc.rank == owner:
            last_d.copy_(hidden_td[(local_idx == n - 1).nonzero()[0, 0]])
        if owner != 0:
            dist.broadcast(last_d, src=owner)
        return self.model.compute_logits(last_d[None])[0] if pc.is_driver else None

    def _decode(self, tokens: list[DecodeToken]) -> torch.Tensor | None:
        pc, dev = self.pc, self.pc.device
        ids_t = torch.tensor([t.token_id for t in tokens], dtype=torch.long, device=dev)
        pos_t = torch.tensor([t.position for t in tokens], dtype=torch.long, device=dev)
        owned = [i for i, t in enumerate(tokens) if t.owner_rank == pc.rank]
        owned_slots = torch.cat([self.kv.append_slots(tokens[i].seq_id, 1) for i in owned]) if owned else None
        owned_t = torch.tensor(owned, dtype=torch.long, device=dev)
        shards = DecodeShards(self.kv, [t.seq_id for t in tokens], self.scale, self.backend)

        def attn(layer: int, q_thd, k_thd, v_thd):
            if owned_slots is not None:
                self.kv.write(layer, owned_slots, k_thd[owned_t], v_thd[owned_t])
            o_thd = decode_over_shards(pc, len(tokens),
                                       lambda rows: shards.partial(layer, q_thd, rows))
            return o_thd.to(q_thd.dtype)

        hidden_td = self.model(ids_t, pos_t, attn, pos_t + 1)
        return self.model.compute_logits(hidden_td) if pc.is_driver else None
