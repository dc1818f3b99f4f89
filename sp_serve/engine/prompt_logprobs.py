"""Prompt logprobs over a rank's own share of a prompt, in vocabulary chunks.

With sequence parallelism each rank holds the final hidden states of its zigzag share of a
prompt chunk. The log-probability of the token at position p+1 given the tokens up to p is
log_softmax(h_p W^T)[t_{p+1}]; every rank computes it for the positions it holds, so a long
document's logprobs take 1/N of the lm-head work per rank and never leave the rank as logits.

No [tokens x vocab] matrix is built: rows are taken `row_block` at a time and the vocabulary
`vocab_chunk` columns at a time, with a running log-sum-exp (max m and sum s of exp(x - m),
rescaled when the max grows), a running top-k, and a running count of the logits above the
chosen token's (its rank, as vLLM reports it). Peak extra memory is row_block x vocab_chunk
float32 (8 MiB at the defaults) plus the result, [rows, 2 + 2k] float32.

Result rows: [logprob of the target, its rank (1 = most likely), top-k logprobs, top-k ids].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_BLOCK = 256
VOCAB_CHUNK = 8192


def row_width(k: int) -> int:
    return 2 + 2 * k


@torch.no_grad()
def token_logprobs(hidden_td: torch.Tensor, weight_vd: torch.Tensor, targets_t: torch.Tensor,
                   k: int, row_block: int = ROW_BLOCK, vocab_chunk: int = VOCAB_CHUNK,
                   vocab_start: int = 0, tp_comm=None) -> torch.Tensor:
    """hidden_td [t, d] (after the final norm), weight_vd the lm head [v, d], targets_t [t] token
    ids; k >= 0 alternatives per row. Returns float32 [t, 2 + 2k] (see the module docstring).

    Tensor parallelism: weight_vd is this rank's vocabulary slice, starting at vocab_start, and
    tp_comm the TP group; every rank of the group calls this with the same rows. Each rank runs
    the same scan over its slice and the slices' statistics are merged (log-sum-exp of the
    lse's, the chosen logit from its owner, counts added, top-k of the top-k's)."""
    t, vocab = hidden_td.shape[0], weight_vd.shape[0]
    tp = tp_comm is not None and tp_comm.world_size > 1
    assert tp or 0 <= k <= vocab, (k, vocab)
    out = torch.empty((t, row_width(k)), dtype=torch.float32, device=hidden_td.device)
    for r0 in range(0, t, row_block):
        h = hidden_td[r0:r0 + row_block]
        target = targets_t[r0:r0 + row_block].to(hidden_td.device) - vocab_start
        rows = h.shape[0]
        # The chosen token's logit, for counting the logits above it (its rank) chunk by chunk.
        owned = (target >= 0) & (target < vocab)
        if tp:  # from the rank that owns the token, zeros elsewhere, summed
            target_logit = torch.zeros(rows, dtype=torch.float32, device=h.device)
            if vocab:
                dot = (h * weight_vd[target.clamp(0, vocab - 1)]).sum(-1).float()
                target_logit = torch.where(owned, dot, target_logit)
            target_logit = tp_comm.all_reduce(target_logit)
        else:
            target_logit = (h * weight_vd[target]).sum(-1).float()
        chosen = torch.full((rows,), float("-inf"), dtype=torch.float32, device=h.device)
        m = torch.full((rows,), float("-inf"), dtype=torch.float32, device=h.device)
        s = torch.zeros(rows, dtype=torch.float32, device=h.device)
        above = torch.zeros(rows, dtype=torch.long, device=h.device)
        top_v = torch.empty((rows, 0), dtype=torch.float32, device=h.device)
        top_i = torch.empty((rows, 0), dtype=torch.long, device=h.device)
        for v0 in range(0, vocab, vocab_chunk):
            x = F.linear(h, weight_vd[v0:v0 + vocab_chunk]).float()  # [rows, chunk]
            width = x.shape[1]
            new_m = torch.maximum(m, x.max(-1).values)
            s = s * torch.exp(m - new_m) + torch.exp(x - new_m[:, None]).sum(-1)
            m = new_m
            inside = (target >= v0) & (target < v0 + width)
            if inside.any():
                local = (target - v0).clamp(0, width - 1)
                here = x.gather(1, local[:, None])[:, 0]
                chosen = torch.where(inside, here, chosen)
                # the token itself is never above itself (the two dot products may round apart)
                above -= (inside & (here > target_logit)).long()
            above += (x > target_logit[:, None]).sum(-1)
            if k:
                cv, ci = torch.topk(x, min(k, width), dim=-1)
                both_v = torch.cat([top_v, cv], 1)
                top_v, order = torch.topk(both_v, min(k, both_v.shape[1]), dim=-1)
                top_i = torch.cat([top_i, ci + v0 + vocab_start], 1).gather(1, order)
        lse = m + torch.log(s)
        if tp:
            lse, chosen, above, top_v, top_i = _merge_slices(tp_comm, lse, chosen, above, top_v,
                                                             top_i, k)
        block = out[r0:r0 + rows]
        block[:, 0] = chosen - lse
        block[:, 1] = (above + 1).float()
        if k:
            block[:, 2:2 + k] = top_v - lse[:, None]
            block[:, 2 + k:2 + 2 * k] = top_i.float()
    return out


def _merge_slices(tp_comm, lse, chosen, above, top_v, top_i, k: int):
    """The whole vocabulary's statistics from every TP rank's slice (one all-gather): token
    ids and counts travel as float32, exact below 2^24."""
    rows = lse.shape[0]
    pad = k - top_v.shape[1]  # a slice narrower than k
    if pad:
        top_v = F.pad(top_v, (0, pad), value=float("-inf"))
        top_i = F.pad(top_i, (0, pad))
    mine = torch.cat([lse[:, None], chosen[:, None], above[:, None].float(), top_v,
                      top_i.float()], 1)
    every = tp_comm.all_gather(mine[None])  # [ranks, rows, 3 + 2k]
    lse = torch.logsumexp(every[:, :, 0], 0)
    chosen = every[:, :, 1].max(0).values
    above = every[:, :, 2].sum(0).long()
    if k:
        all_v = every[:, :, 3:3 + k].permute(1, 0, 2).reshape(rows, -1)
        all_i = every[:, :, 3 + k:].permute(1, 0, 2).reshape(rows, -1)
        top_v, order = torch.topk(all_v, k, dim=-1)
        top_i = all_i.gather(1, order).long()
    return lse, chosen, above, top_v, top_i
