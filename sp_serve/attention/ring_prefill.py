"""Zigzag ring attention over the fresh K/V of one prompt chunk.

Rank r holds chunks r and 2N-1-r (ZigzagLayout) in that order; positions increase along that
local order, so step 0 (own K/V) is a plain causal block. At step s the K/V in hand came from
rank src = r - s (mod N), which holds chunks src and 2N-1-src:
  - src < r: every local query is later than chunk src and earlier than chunk 2N-1-src, so all
    local queries attend to src's first chunk, fully, and to nothing else;
  - src > r: only the local late chunk (2N-1-r) is later than src's two chunks, and it attends
    to both fully; the early chunk r precedes both.
So each step is one full (unmasked) block and every rank does the same work. The block for step
s+1 is posted before step s computes, so the transfer hides behind it (`Communicator.ring`:
isend/irecv on NCCL and gloo; on shared memory every block is posted at once and read in place).
Only KV heads travel.

Legend: t tokens, h heads, d head_dim; kv_2thd packs k and v for one transfer.
"""
from __future__ import annotations

import torch

from sp_serve.attention.local import attention_with_lse
from sp_serve.attention.merge import PartialAccumulator
from sp_serve.attention.zigzag import ZigzagLayout
from sp_serve.parallel.groups import ParallelContext


def ring_prefill_attention(
    pc: ParallelContext,
    layout: ZigzagLayout,
    q_thd: torch.Tensor,
    k_thd: torch.Tensor,
    v_thd: torch.Tensor,
    scale: float,
    backend: str = "torch",
) -> PartialAccumulator:
    """The causal attention of the local queries over the whole chunk's K/V, as a running
    (o, lse) to which the caller may merge more partials."""
    rank = pc.sp_rank
    early_len, late_len = layout.chunk_lens(rank)
    kv_2thd = torch.stack([k_thd, v_thd])
    kv_shape = lambda src: (2, layout.num_local(src), *kv_2thd.shape[2:])  # noqa: E731
    for src, block_2thd in pc.comm.ring(kv_2thd, kv_shape):
        if src == rank:
            acc = PartialAccumulator(*attention_with_lse(q_thd, k_thd, v_thd, True, scale, backend))
        elif src < rank:
            src_early = layout.chunk_lens(src)[0]
            o, lse = attention_with_lse(q_thd, block_2thd[0, :src_early], block_2thd[1, :src_early],
                                        False, scale, backend)
            acc.add(slice(None), o, lse)
        elif late_len > 0:
            late = slice(early_len, early_len + late_len)
            o, lse = attention_with_lse(q_thd[late], block_2thd[0], block_2thd[1], False, scale, backend)
            acc.add(late, o, lse)
    return acc
