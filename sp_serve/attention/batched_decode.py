"""A decode batch's partials over this rank's shards for the torch backend (the CPU path), in a
few ops per layer for the whole batch.

Per step (once, on the host: the layout is the same for every layer), every sequence's shard is
cut into pieces of at most `PIECE_TOKENS` tokens (whole blocks, in table order: only the last
piece can end inside a block), and the pieces are sorted by length and cut into groups: a piece
joins the group of the longer ones while the padding it needs stays within `MAX_PADDING` tokens
and the group within `GROUP_TOKENS` tokens (padding included). Per layer, a group is
  - one index_select of its blocks per K and V (plus dequantization on a quantized cache):
    [pieces, width, kv heads, d], a copy that lands in the cache, which the attention then reads;
  - zeros written over the padding rows (slots never written may hold NaN, which a mask alone
    does not stop: 0 x NaN);
  - one masked attention call (torch's flash kernel for CPU) that returns o and lse per piece.
    GQA: the query heads that share a KV head are folded into that head's query rows, so no KV
    head is repeated.
The pieces' partials are then merged per sequence by lse in one go (a sequence of one piece
needs no merge); a sequence with nothing on this rank gets o = 0, lse = -inf, which weighs 0 in
the merge across ranks.

Why this shape, on one CPU thread (SmolLM2-135M: 9/3 heads, d 64, fp32; see
`benchmarks/decode_attention.py`): the per-sequence path it replaces (a view of the longest run,
a copy of the decode tail, two attention calls, an lse merge: ~40 small ops) cost ~190 us per
sequence and layer at 100 tokens, where the attention itself takes ~30 us. And the flash kernel
reading K/V in place, from memory, runs at a fraction of the speed it reaches on K/V that is in
the cache (its strided, small-matrix reads do not stream): an index_select copy streams, so
gathering first and attending a cache-sized group is faster than attending in place, for long
shards too. Hence pieces (an 8K-token shard is 8 pieces of 1K) and groups of a few MiB.

Legend: b batch (one query per sequence), r pieces (rows), h q heads, hkv kv heads, q q heads
per kv head, d head_dim, t tokens, s block size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sp_serve.attention.merge import merge_partials
from sp_serve.kv.cache import PagedKVCache

# A piece of a shard holds at most this many tokens (rounded down to whole blocks).
PIECE_TOKENS = 1024
# A piece joins a group while its padding (the group's width - its tokens) is at most this.
MAX_PADDING = 256
# Tokens of one group, padding included: its gathered K/V (1.5 KiB a token for SmolLM2 in fp32)
# are read back from the cache.
GROUP_TOKENS = 2048


@dataclass
class _Group:
    rows: slice  # its pieces' rows of the step's partials
    q_rows: torch.Tensor  # [r] the batch row (query) of each piece
    blocks: torch.Tensor  # [r * m] block ids, piece after piece (padded with the piece's first)
    width: int  # m * s tokens per piece
    pad: torch.Tensor | None  # flat token indices past each piece's tokens: zeroed, masked
    mask: torch.Tensor | None  # [r, 1, 1, width] additive: 0 for a token, -inf for padding


class BatchedDecodeShards:
    """The layout of one decode step's shards on this rank (built once per step), and the
    packed partials [b, h, d+1] fp32 of the batch's queries over them, layer after layer."""

    def __init__(self, kv: PagedKVCache, seq_ids: list[int], piece_tokens: int | None = None,
                 max_padding: int | None = None, group_tokens: int | None = None):
        s, dev = kv.block_size, kv.device
        piece_blocks = max(1, (PIECE_TOKENS if piece_tokens is None else piece_tokens) // s)
        max_padding = MAX_PADDING if max_padding is None else max_padding
        group_tokens = GROUP_TOKENS if group_tokens is None else group_tokens
        self.kv, self.batch = kv, len(seq_ids)
        pieces: list[tuple[int, list[int], int]] = []  # (batch row, blocks, tokens)
        counts = []
        for row, seq_id in enumerate(seq_ids):
            table, n = kv.block_table(seq_id), kv.num_tokens(seq_id)
            nb = -(-n // s)
            counts.append(-(-nb // piece_blocks))
            for i in range(0, nb, piece_blocks):
                blocks = table[i:min(i + piece_blocks, nb)]
                pieces.append((row, blocks, min(n, (i + len(blocks)) * s) - i * s))
        pieces.sort(key=lambda p: -p[2])
        self.groups: list[_Group] = []
        i = 0
        while i < len(pieces):
            width = len(pieces[i][1]) * s
            j = i + 1
            while (j < len(pieces) and width - pieces[j][2] <= max_padding
                   and (j + 1 - i) * width <= group_tokens):
                j += 1
            self.groups.append(self._group(pieces[i:j], slice(i, j), width, dev))
            i = j
        self.num_rows = len(pieces)
        # Where each sequence's partials are: rows of [pieces + 1], the last an empty partial.
        most = max([1, *counts])
        where = [[self.num_rows] * self.batch for _ in range(most)]
        seen = [0] * self.batch
        for r, (row, _, _) in enumerate(pieces):
            where[seen[row]][row] = r
            seen[row] += 1
        self.where = torch.tensor(where, dtype=torch.long, device=dev)  # [most, b]

    def _group(self, pieces: list[tuple[int, list[int], int]], rows: slice, width: int,
               dev: torch.device) -> _Group:
        m = width // self.kv.block_size
        blocks = [b for _, bl, _ in pieces for b in bl + [bl[0]] * (m - len(bl))]
        tokens = torch.tensor([t for _, _, t in pieces])
        valid_rt = torch.arange(width)[None, :] < tokens[:, None]
        pad = mask = None
        if not bool(valid_rt.all()):
            pad = (~valid_rt).flatten().nonzero().flatten().to(dev)
            mask = torch.zeros(valid_rt.shape, dtype=self.kv.dtype).masked_fill_(
                ~valid_rt, float("-inf"))[:, None, None, :].to(dev)
        return _Group(rows, torch.tensor([r for r, _, _ in pieces], dtype=torch.long, device=dev),
                      torch.tensor(blocks, dtype=torch.long, device=dev), width, pad, mask)

    def partial(self, layer: int, q_bhd: torch.Tensor, scale: float) -> torch.Tensor:
        """Packed partial [b, h, d+1] fp32 of q_bhd (this layout's b queries) over the shards."""
        b, h, d = q_bhd.shape
        hkv = self.kv.k_lthd.shape[2]
        # One row per piece, and an empty partial (o = 0, lse = -inf) last.
        parts_rhe = torch.empty((self.num_rows + 1, h, d + 1), dtype=torch.float32,
                                device=q_bhd.device)
        parts_rhe[-1, :, :d] = 0.0
        parts_rhe[-1, :, d] = float("-inf")
        for g in self.groups:
            k_thd, v_thd = self.kv.read_blocks(layer, g.blocks)
            if g.pad is not None:
                k_thd.index_fill_(0, g.pad, 0)
                v_thd.index_fill_(0, g.pad, 0)
            r = g.q_rows.numel()
            q = q_bhd.index_select(0, g.q_rows).view(r, hkv, h // hkv, d)
            o, lse = attend(q, k_thd.view(r, g.width, hkv, d).transpose(1, 2),
                            v_thd.view(r, g.width, hkv, d).transpose(1, 2), g.mask, scale)
            parts_rhe[g.rows, :, :d] = o.reshape(r, h, d)
            parts_rhe[g.rows, :, d] = lse.reshape(r, h)
        if self.where.shape[0] == 1:
            return parts_rhe.index_select(0, self.where[0])
        per_seq = parts_rhe.index_select(0, self.where.flatten()).view(-1, b, h, d + 1)
        o_bhd, lse_bh = merge_partials(per_seq[..., :d], per_seq[..., d])
        return torch.cat([o_bhd, lse_bh.unsqueeze(-1)], dim=-1)


def attend(q_bhqd: torch.Tensor, k_bhtd: torch.Tensor, v_bhtd: torch.Tensor,
           mask_b11t: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o [b, hkv, q, d] (q's dtype) and lse [b, hkv, q] of each row's queries over its keys,
    with an additive mask (0 or -inf) over the keys; every row must have a key unmasked. On
    CPU, torch's flash kernel for CPU (it takes the mask and strided K/V); elsewhere, the
    plain computation in fp32."""
    if mask_b11t is not None and mask_b11t.dtype != q_bhqd.dtype:
        mask_b11t = mask_b11t.to(q_bhqd.dtype)
    if q_bhqd.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_bhqd, k_bhtd, v_bhtd, 0.0, False, attn_mask=mask_b11t, scale=scale)
    return attend_math(q_bhqd, k_bhtd, v_bhtd, mask_b11t, scale)


def attend_math(q_bhqd, k_bhtd, v_bhtd, mask_b11t, scale):
    """`attend` as plain matmuls and a softmax in fp32 (any device)."""
    s_bhqt = torch.matmul(q_bhqd.float(), k_bhtd.float().transpose(-1, -2)) * scale
    if mask_b11t is not None:
        s_bhqt = s_bhqt + mask_b11t.float()
    lse_bhq = torch.logsumexp(s_bhqt, dim=-1)
    o = torch.matmul(torch.exp(s_bhqt - lse_bhq[..., None]), v_bhtd.float())
    return o.to(q_bhqd.dtype), lse_bhq
