"""Plain-torch references for every kernel in this package (the test oracle).

Written for clarity, not speed: loops over sequences, repeats KV heads, computes in float64 by
default. Each one takes the same arguments as its Triton counterpart and returns results in
`compute_dtype` so tests compare against the exact value, not a rounded one.

Shape legend
    t  tokens packed over all sequences       h  heads (q heads unless named kv)
    d  head_dim                               b  sequences in a decode batch
    p  partials being merged                  n  keys of one sequence
    q  queries of one sequence
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _attend_one(
    q_qhd: torch.Tensor,
    k_nhd: torch.Tensor,
    v_nhd: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence; kv heads already repeated to the q head count.

    Returns out [q, h, d] and lse [h, q]. Rows that see no key get out 0 and lse -inf.
    """
    num_q, num_k = q_qhd.shape[0], k_nhd.shape[0]
    scores_hqn = torch.einsum("qhd,nhd->hqn", q_qhd, k_nhd) * softmax_scale
    if causal:
        # Bottom-right aligned: query i sees keys j <= i + num_k - num_q.
        q_idx = torch.arange(num_q, device=q_qhd.device)[:, None]
        k_idx = torch.arange(num_k, device=q_qhd.device)[None, :]
        scores_hqn = scores_hqn.masked_fill(k_idx > q_idx + num_k - num_q, float("-inf"))
    lse_hq = torch.logsumexp(scores_hqn, dim=-1)  # -inf for rows with no visible key
    # exp(score - lse) is 0 for masked keys; guard rows whose lse is -inf (would be NaN).
    probs_hqn = torch.exp(scores_hqn - lse_hq[..., None].clamp_min(torch.finfo(lse_hq.dtype).min))
    probs_hqn = torch.where(torch.isinf(lse_hq)[..., None], 0.0, probs_hqn)
    out_qhd = torch.einsum("hqn,nhd->qhd", probs_hqn, v_nhd)
    return out_qhd, lse_hq


def prefill_attention_ref(
    q_thd: torch.Tensor,
    k_thd: torch.Tensor,
    v_thd: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention over packed sequences. Returns (out [Tq, Hq, D], lse [Hq, Tq])."""
    num_q_heads, num_kv_heads = q_thd.shape[1], k_thd.shape[1]
    group = num_q_heads // num_kv_heads
    q_thd, k_thd, v_thd = (x.to(compute_dtype) for x in (q_thd, k_thd, v_thd))
    out_thd = torch.zeros_like(q_thd)
    lse_ht = torch.full(
        (num_q_heads, q_thd.shape[0]), float("-inf"), dtype=compute_dtype, device=q_thd.device
    )
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for seq in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[seq], cu_q[seq + 1], cu_k[seq], cu_k[seq + 1]
        if q1 == q0:
            continue
        k_nhd = k_thd[k0:k1].repeat_interleave(group, dim=1)
        v_nhd = v_thd[k0:k1].repeat_interleave(group, dim=1)
        out_thd[q0:q1], lse_ht[:, q0:q1] = _attend_one(
            q_thd[q0:q1], k_nhd, v_nhd, causal, softmax_scale
        )
    return out_thd, lse_ht


def paged_decode_attention_ref(
    q_bhd: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
    compute_dtype: torch.dtype = torch.float64,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over a paged cache [blocks, block_size, Hkv, D]; a quantized
    cache's elements are multiplied by kv_scales [blocks, block_size, Hkv] (k's, v's) and
    rounded to q's dtype, as the kernel does (the float32 product of an 8-bit element and a
    bfloat16 scale is exact).

    Returns (out [B, Hq, D], lse [B, Hq]).
    """
    if kv_scales is not None:
        k_cache, v_cache = ((c.float() * s.float()[..., None]).to(q_bhd.dtype)
                            for c, s in zip((k_cache, v_cache), kv_scales))
    batch, num_q_heads, _ = q_bhd.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out_bhd = torch.zeros(q_bhd.shape, dtype=compute_dtype, device=q_bhd.device)
    lse_bh = torch.full((batch, num_q_heads), float("-inf"), dtype=compute_dtype,
                        device=q_bhd.device)
    for b, ctx in enumerate(context_lens.tolist()):
        if ctx == 0:
            continue
        pages = block_tables[b, : (ctx + block_size - 1) // block_size].long()
        k_nhd = k_cache[pages].flatten(0, 1)[:ctx].to(compute_dtype)
        v_nhd = v_cache[pages].flatten(0, 1)[:ctx].to(compute_dtype)
        out_qhd, lse_hq = _attend_one(
            q_bhd[b : b + 1].to(compute_dtype),
            k_nhd.repeat_interleave(group, dim=1),
            v_nhd.repeat_interleave(group, dim=1),
            causal=False,
            softmax_scale=softmax_scale,
        )
        out_bhd[b], lse_bh[b] = out_qhd[0], lse_hq[:, 0]
    return out_bhd, lse_bh


def merge_attention_partials_ref(
    o_phd: torch.Tensor | Sequence[torch.Tensor],
    lse_pht: torch.Tensor | Sequence[torch.Tensor],
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials o [P, T, H, D] with lse [P, H, T]. Returns (out [T, H, D], lse [H, T])."""
    if not isinstance(o_phd, torch.Tensor):
        o_phd = torch.stack(list(o_phd))
    if not isinstance(lse_pht, torch.Tensor):
        lse_pht = torch.stack(list(lse_pht))
    o_phd = o_phd.to(compute_dtype)
    lse_pth = lse_pht.to(compute_dtype).transpose(1, 2)
    lse_th = torch.logsumexp(lse_pth, dim=0)  # -inf where every partial is -inf
    # A partial with lse -inf has weight 0 and its out is ignored, even if it holds garbage.
    weight_pth = torch.exp(lse_pth - lse_th.clamp_min(torch.finfo(compute_dtype).min))
    weight_pthd = torch.where(torch.isinf(lse_pth), 0.0, weight_pth)[..., None]
    out_thd = torch.where(weight_pthd > 0, weight_pthd * o_phd, 0.0).sum(0)
    return out_thd, lse_th.transpose(0, 1)


def rope_and_cache_kv_ref(
    k_thd: torch.Tensor,
    v_thd: torch.Tensor,
    cos_tf: torch.Tensor,
    sin_tf: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """The unfused eager path, in place: rotate-half RoPE in k's dtype, then index writes.

    Not float64 on purpose: the kernel promises the same bits as this eager expression.
    Returns the rotated k [T, Hkv, D].
    """
    num_tokens, _, head_dim = k_thd.shape
    cos_t1f = cos_tf.reshape(num_tokens, 1, -1)
    sin_t1f = sin_tf.reshape(num_tokens, 1, -1)
    x1_thf, x2_thf = k_thd[..., : head_dim // 2], k_thd[..., head_dim // 2 :]
    k_rot_thd = torch.cat((x1_thf * cos_t1f - x2_thf * sin_t1f,
                           x2_thf * cos_t1f + x1_thf * sin_t1f), dim=-1)
    keep_t = slot_mapping >= 0
    slots = slot_mapping[keep_t].long()
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k_rot_thd[keep_t].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v_thd[keep_t].to(v_cache.dtype)
    return k_rot_thd
