"""The worker: the only code that touches a device. One per rank; every rank runs the same
StepPlan. Rank 0 gets back float32 logits for the sequences that sample this step, and (in
`prompt_logprobs`) the prompt logprobs of chunks that asked for them.

A step is one forward pass over this rank's tokens: each prompt chunk's zigzag share (at the
tokens' global positions), then the decode batch (replicated along SP: every SP rank runs the
dense layers for every decode token). With tensor parallelism "rank" below means the SP rank:
the ranks of a TP group hold the same tokens and each runs its own heads (model/llama.py). The dense layers read the weights once for all of them; attention keeps
the two batches apart:
  - a prompt chunk: zigzag ring over the chunk's fresh K/V, plus (for a chunk after earlier
    chunks) the queries' attention to every rank's cached shard in place;
  - the decode batch: each rank's partial over its own shard, merged by lse; each decode
    token's K/V is stored on one rank only (the engine's placement).
On CPU a step's fixed cost is mostly reading the weights (a memory-bound pass), so a decode
batch riding along a prompt chunk costs little more than the chunk alone.

Everything the layers need (token ids, positions, slots, shard runs, block tables) is built once
per step on the host and copied to the device in one non-blocking transfer (`to_device`); the
per-layer code makes no tensor from a Python list and reads nothing back to the host.

Legend: t tokens, h heads, d head_dim (hidden size for hidden states), b batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sp_serve.attention.local import attention_over_pieces, attention_with_lse
from sp_serve.attention.ring_prefill import ring_prefill_attention
from sp_serve.attention.sharded_cache import (
    TABLE_WIDTH_MULTIPLE,
    DecodeShards,
    chunk_over_shards,
    decode_over_shards,
    pack_partial,
    paged_decode_supported,
)
from sp_serve.attention.zigzag import ZigzagLayout
from sp_serve.engine.plan import PrefillChunk, StepPlan
from sp_serve.engine.prompt_logprobs import row_width, token_logprobs
from sp_serve.kv.cache import PagedKVCache
from sp_serve.parallel.groups import ParallelContext


@dataclass
class _ChunkPart:
    """One prompt chunk's share on this rank: rows [start, stop) of the step's local tokens."""

    seq_id: int
    rows: slice
    local_idx: torch.Tensor  # the chunk indices of these rows
    layout: ZigzagLayout
    cached_runs: list[tuple[int, int]] | None  # this rank's shard of the earlier chunks
    last_row: int | None  # the local row of the chunk's last token, if this rank holds it and
    # the chunk ends its prompt (rank 0 samples from it)


def to_device(host: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
    """A step's host metadata (int tensors) on `dev` in one host-to-device copy: concatenated as
    int64, pinned, copied without blocking the host, then split into views (each cast back to
    its dtype on the device). Each piece starts 64-byte aligned (Triton specializes pointer
    arguments on alignment: it must not vary from step to step). On CPU: the tensors as they are.
    """
    if dev.type == "cpu":
        return host
    align = 8  # int64 elements: 64 bytes
    sizes = [t.numel() for t in host]
    starts, offset = [], 0
    for n in sizes:
        starts.append(offset)
        offset += -(-n // align) * align
    flat = torch.zeros(max(offset, 1), dtype=torch.long)
    for t, a, n in zip(host, starts, sizes):
        flat[a:a + n] = t.reshape(-1)
    if dev.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(dev, non_blocking=True)
    out = []
    for t, a, n in zip(host, starts, sizes):
        piece = flat[a:a + n].view(t.shape)
        out.append(piece if t.dtype == torch.long else piece.to(t.dtype))
    return out


class Worker:
    def __init__(self, pc: ParallelContext, model, spec, kv: PagedKVCache, backend: str = "torch"):
        self.pc, self.model, self.spec, self.kv = pc, model, spec, kv
        self.scale = spec.softmax_scale
        self.backend = backend
        # rank 0, after each execute: {seq_id: [chunk tokens, 2 + 2k]} for chunks that asked
        # for prompt logprobs (row i scores the token after chunk index i; see prompt_logprobs.py)
        self.prompt_logprobs: dict[int, torch.Tensor] = {}
        self.paged_decode = paged_decode_supported(backend, pc.device)

    @property
    def uses_triton(self) -> bool:
        return self.backend == "triton" or self.paged_decode

    @torch.inference_mode()
    def warm_up(self, max_batch: int, long_context: int = 2048) -> int:
        """Runs every Triton kernel variant serving can reach, on this rank alone (no
        collective), before the first request: a compile in the middle of serving would stall
        this rank while the others wait for it in a collective. Step-dependent kernel arguments
        are not specialized (sp_serve_kernels: `no_specialize`), so the variants left are the
        constexpr ones: causal or full prefill blocks; decode with one KV split or several (and
        the split merge, whose head block depends on the batch: every batch size up to
        max_batch). Uses a few blocks of the pool, freed again. Returns the launches made."""
        if not self.uses_triton:
            return 0
        spec, kv, dev = self.spec, self.kv, self.pc.device
        dtype = kv.dtype
        hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        launches = 0
        if self.backend == "triton":
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(64, hq, d, generator=g).to(dev, dtype)
            k = torch.randn(64, hkv, d, generator=g).to(dev, dtype)
            for tq, tk, causal in ((64, 64, True), (1, 1, True), (17, 64, False), (64, 3, False)):
                attention_with_lse(q[:tq], k[:tk], k[:tk], causal, self.scale, self.backend)
                launches += 1
        if self.paged_decode and kv.num_free_blocks >= 2:
            # Two dummy shards (no engine sequence has a negative id): one block (a narrow block
            # table: one KV split) and a long one (several splits, then their merge). Every
            # batch size: the merge kernel's head block changes with it.
            short, long = -(1 << 40), -(1 << 40) - 1
            kv.append_slots(short, 1)
            kv.append_slots(long, max(1, min(long_context,
                                             (kv.num_free_blocks // 2) * kv.block_size)))
            try:
                q = torch.zeros(max_batch, hq, d, dtype=dtype, device=dev)
                for batch in range(1, max_batch + 1):
                    for seq in (short, long):
                        shards = DecodeShards(kv, [seq] * batch, self.scale, self.backend, True)
                        shards.partial(0, q, slice(0, batch))
                        launches += 1
            finally:
                kv.free(short)
                kv.free(long)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return launches

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """Runs one step; returns {seq_id: logits [vocab] fp32} on rank 0 (empty elsewhere)."""
        self.prompt_logprobs = {}
        for seq_id in plan.free_seq_ids:
            self.kv.free(seq_id)
        self.kv.apply(plan.kv_ops, self.pc.sp_rank)  # before any append: a share copies blocks
        if not (plan.prefill or plan.decode):
            return {}
        pc, dev = self.pc, self.pc.device
        # Everything below is built on the host and reaches the device in one copy (to_device).
        ids, pos, rope_len, write_rows, write_slots, parts = [], [], [], [], [], []
        row = 0
        for chunk in plan.prefill:
            n = len(chunk.token_ids)
            layout = ZigzagLayout(n, pc.sp_size)
            local_idx = layout.local_indices(pc.sp_rank)
            m = len(local_idx)
            ids.append(torch.tensor(chunk.token_ids, dtype=torch.long)[local_idx])
            pos.append(local_idx + chunk.start_pos)
            rope_len.append(torch.full((m,), max(chunk.total_len, chunk.start_pos + n), dtype=torch.long))
            cached = self.kv.runs(chunk.seq_id) if chunk.start_pos > 0 else None
            write_rows.append(torch.arange(row, row + m))
            write_slots.append(self.kv.append_slots(chunk.seq_id, m, host=True))
            last = None
            if chunk.want_logits and layout.owner_of(n - 1) == pc.sp_rank:
                last = row + int((local_idx == n - 1).nonzero()[0, 0])
            parts.append(_ChunkPart(chunk.seq_id, slice(row, row + m), local_idx, layout, cached,
                                    last))
            row += m
        decode_rows = slice(row, row + len(plan.decode))
        tables: list[torch.Tensor] = []
        if plan.decode:
            ids.append(torch.tensor([t.token_id for t in plan.decode], dtype=torch.long))
            dpos = torch.tensor([t.position for t in plan.decode], dtype=torch.long)
            pos.append(dpos)
            rope_len.append(dpos + 1)
            owned = [i for i, t in enumerate(plan.decode) if t.owner_rank == pc.sp_rank]
            if owned:
                write_rows.append(torch.tensor(owned, dtype=torch.long) + row)
                write_slots.extend(self.kv.append_slots(plan.decode[i].seq_id, 1, decode=True,
                                                        host=True) for i in owned)
            if self.paged_decode:  # after the new tokens' slots exist: decode attends to them
                tables = list(self.kv.block_tables([t.seq_id for t in plan.decode], host=True,
                                                   width_multiple=TABLE_WIDTH_MULTIPLE))
        host = [torch.cat(ids), torch.cat(pos), torch.cat(rope_len)]
        if write_rows:
            host += [torch.cat(write_rows), torch.cat(write_slots)]
        on_dev = to_device(host + tables, dev)
        ids_t, pos_t, rope_len_t = on_dev[:3]
        write_rows_t, write_slots_t = on_dev[3:5] if write_rows else (None, None)
        shards = None
        if plan.decode:
            shards = DecodeShards(self.kv, [t.seq_id for t in plan.decode], self.scale,
                                  self.backend, self.paged_decode,
                                  tuple(on_dev[-2:]) if tables else None)
        rows_are_prefix = write_rows_t is not None and write_rows_t.numel() == row and not plan.decode

        def attn(layer: int, q_thd, k_thd, v_thd):
            if write_slots_t is not None:
                # A quantized cache hands back K/V as stored (dequantized): the ring attends to
                # what decode and later chunks will read, so a chunked prompt equals one pass.
                k_thd, v_thd = self.kv.write(layer, write_slots_t, k_thd, v_thd,
                                             None if rows_are_prefix else write_rows_t)
            o_thd = torch.empty_like(q_thd)
            for part in parts:
                o_thd[part.rows] = self._chunk_attention(layer, part, q_thd[part.rows],
                                                         k_thd[part.rows], v_thd[part.rows])
            if shards is not None:
                q_bhd = q_thd[decode_rows]
                o_thd[decode_rows] = decode_over_shards(
                    pc, len(plan.decode), lambda rows: shards.partial(layer, q_bhd, rows))
            return o_thd

        rope_lengths = None
        if self.model.rope.rope_type == "dynamic":  # its distinct lengths, from the host copy
            rope_lengths = torch.unique(host[2]).tolist()
        hidden_td = self.model(ids_t, pos_t, attn, rope_len_t, rope_lengths=rope_lengths)
        if any(chunk.prompt_logprobs is not None for chunk in plan.prefill):
            self.prompt_logprobs = self._prompt_logprobs(plan.prefill, parts, hidden_td)
        return self._logits(plan, parts, hidden_td, decode_rows)

    def _prompt_logprobs(self, chunks: list[PrefillChunk], parts: list[_ChunkPart],
                         hidden_td: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each rank scores the positions it holds (prompt_logprobs.py: vocabulary chunks, no
        [tokens x vocab] matrix); the rows, [chunk tokens, 2 + 2k] per chunk, reach rank 0 in
        one collective for all chunks (each row filled by its owner, zeros elsewhere)."""
        wanted = [(chunk, part) for chunk, part in zip(chunks, parts)
                  if chunk.prompt_logprobs is not None]
        pieces = []
        for chunk, part in wanted:
            k, n = chunk.prompt_logprobs, len(chunk.token_ids)
            rows = torch.zeros((n, row_width(k)), dtype=torch.float32, device=hidden_td.device)
            targets = chunk.token_ids[1:] + ([] if chunk.next_token_id is None
                                             else [chunk.next_token_id])
            scored = part.local_idx < len(targets)  # the prompt's last token has no target
            if bool(scored.any()):
                idx = part.local_idx[scored]
                targets_t = torch.tensor(targets, dtype=torch.long)[idx]
                local_rows = torch.arange(part.rows.start, part.rows.stop)[scored]
                rows[idx.to(rows.device)] = token_logprobs(
                    hidden_td[local_rows.to(hidden_td.device)], self.model.lm_head_weight,
                    targets_t.to(hidden_td.device), k, vocab_start=self.model.vocab_start,
                    tp_comm=self.pc.tp_comm)
            pieces.append(rows.flatten())
        flat = self.pc.comm.sum_to_first(torch.cat(pieces))
        if not self.pc.is_driver:
            return {}
        out, at = {}, 0
        for chunk, _ in wanted:
            n, width = len(chunk.token_ids), row_width(chunk.prompt_logprobs)
            out[chunk.seq_id] = flat[at:at + n * width].view(n, width).cpu()
            at += n * width
        return out

    def _chunk_attention(self, layer: int, part: _ChunkPart, q_thd, k_thd, v_thd) -> torch.Tensor:
        pc = self.pc
        acc = ring_prefill_attention(pc, part.layout, q_thd, k_thd, v_thd, self.scale, self.backend)
        if part.cached_runs is not None:
            pieces = self.kv.read_pieces(layer, part.cached_runs)

            def local_partial_for(qq_thd):
                return pack_partial(*attention_over_pieces(qq_thd, pieces, self.scale, self.backend))

            q_per_rank = [part.layout.num_local(r) for r in range(pc.sp_size)]
            o, lse = chunk_over_shards(pc, q_thd, q_per_rank, local_partial_for)
            acc.add(slice(None), o, lse)
        return acc.o_thd.to(q_thd.dtype)

    def _logits(self, plan: StepPlan, parts: list[_ChunkPart], hidden_td: torch.Tensor,
                decode_rows: slice) -> dict[int, torch.Tensor]:
        """Rank 0's logits for the prompts that end this step and for the decode batch.

        On CPU the SP ranks split the LM head's vocabulary (CausalLM.compute_logits(sp=)): it
        reads every vocabulary row each step (113 MB for SmolLM2 in fp32), memory-bound on a
        core, which rank 0 did alone while the others waited at the next collective. Every SP
        rank then needs the same rows, bit for bit: one collective brings them all (a prompt's
        last token from the rank that holds it, the decode rows from SP rank 0, whose copy of
        them may differ from another rank's in the last bits: each rank's matmuls see its own
        number of prompt rows; zeros elsewhere). On a GPU the LM head is a fraction of a
        millisecond and the gathered logits could cross nodes: rank 0's rows come to it alone
        and it computes them all."""
        ending = [i for i, chunk in enumerate(plan.prefill) if chunk.want_logits]
        if not (ending or plan.decode):
            return {}
        pc = self.pc
        split = pc.sp_size > 1 and pc.device.type == "cpu"
        seq_ids = [plan.prefill[i].seq_id for i in ending] + [t.seq_id for t in plan.decode]
        rows_td = hidden_td[decode_rows]
        if ending or split:
            rows_td = torch.zeros((len(seq_ids), hidden_td.shape[-1]), dtype=hidden_td.dtype,
                                  device=hidden_td.device)
            for j, i in enumerate(ending):
                if parts[i].last_row is not None:
                    rows_td[j] = hidden_td[parts[i].last_row]
            if plan.decode and (pc.sp_rank == 0 or not split):
                rows_td[len(ending):] = hidden_td[decode_rows]
            if split:
                rows_td = pc.comm.all_reduce(rows_td)
            else:
                summed = pc.comm.sum_to_first(rows_td[:len(ending)])
                rows_td = None if summed is None else torch.cat([summed, rows_td[len(ending):]])
        if not split and pc.sp_rank != 0:
            return {}  # the first SP rank's TP group computes the logits, together
        # the first SP rank's TP group gathers the TP slices, together
        logits = self.model.compute_logits(rows_td, (pc.sp_rank, pc.sp_size, pc.comm) if split
                                           else None, gather_tp=pc.sp_rank == 0)
        if not pc.is_driver:
            return {}
        return {seq_id: logits[i] for i, seq_id in enumerate(seq_ids)}
