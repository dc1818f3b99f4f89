"""Paged decode attention (flash-decoding): one query token per sequence, split over the KV.

Stage 1: one program per (sequence, kv head, split) streams its share of the sequence's keys
out of the paged cache with an online softmax and writes a partial (out, lse). The q heads of a
GQA group share their kv head, so they ride together as the rows of one tile: each K/V byte is
read once per group, not once per q head, and the group gives tl.dot its M dimension.
Stage 2: the partials of all splits are merged by log-sum-exp (lse_merge.py). With one split,
stage 1 writes the final result and stage 2 is skipped.

A quantized cache (int8 or float8 elements with one scale per token and kv head, see
sp_serve/kv/quant.py) is read in place: each K/V tile is multiplied by its rows' scales as it is
loaded, so a byte per element crosses memory instead of two or four.

Splits divide each sequence's own context (read on the device), so the host never has to
know the context lengths: no device sync, and the launch is CUDA-graph friendly.

Shape legend
    b  sequences      h  q heads     d  head_dim     s  KV splits
    g  q heads of one GQA group (rows of a tile)    n  keys of one step (BLOCK_N)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._env import interpreting, next_pow2
from ._tl_common import dot_flags, load_tile, mma, no_specialize
from .lse_merge import merge_attention_partials

_LOG2E = 1.4426950408889634
_QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit(**no_specialize("num_splits", "stride_tables_b", "stride_os", "stride_ob",
                             "stride_ls", "stride_lb",
                             alignment=("block_tables_ptr", "context_lens_ptr")))
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
    k_scale_ptr, v_scale_ptr,
    qk_scale_log2, group_size, num_splits,
    stride_qb, stride_qh,
    stride_kblk, stride_kslot, stride_kh,
    stride_vblk, stride_vslot, stride_vh,
    stride_sblk, stride_sslot, stride_sh,
    stride_tables_b,
    stride_os, stride_ob, stride_oh,
    stride_ls, stride_lb, stride_lh,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    # Split s covers keys [start, end); rounded to BLOCK_N so only the last step is ragged.
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    group_g = tl.arange(0, BLOCK_G)
    heads_g = kv_head * group_size + group_g
    head_ok_g = group_g < group_size
    dims_d = tl.arange(0, BLOCK_D)
    dim_ok_d = dims_d < HEAD_DIM
    q_gd = load_tile(q_ptr + seq * stride_qb + heads_g[:, None] * stride_qh + dims_d[None, :],
                     head_ok_g, dims_d, True, HEAD_DIM, BLOCK_D)

    table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_tables_b
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    k_scale_base = k_scale_ptr + kv_head * stride_sh
    v_scale_base = v_scale_ptr + kv_head * stride_sh
    m_g = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_g = tl.zeros([BLOCK_G], tl.float32)
    acc_gd = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        tokens_n = n0 + tl.arange(0, BLOCK_N)
        token_ok_n = tokens_n < end
        # Table entries past the sequence may hold anything: never read them (mask).
        pages_n = tl.load(table_row_ptr + tokens_n // PAGE_SIZE, mask=token_ok_n, other=0)
        rows_n = pages_n.to(tl.int64) * stride_kblk + (tokens_n % PAGE_SIZE) * stride_kslot
        k_nd = load_tile(k_base + rows_n[:, None] + dims_d[None, :], token_ok_n, dims_d,
                         True, HEAD_DIM, BLOCK_D)
        if QUANT:  # one byte per element, one scale per (token, kv head): dequantize in place
            rows_s_n = pages_n.to(tl.int64) * stride_sblk + (tokens_n % PAGE_SIZE) * stride_sslot
            k_s_n = tl.load(k_scale_base + rows_s_n, mask=token_ok_n, other=0.0).to(tl.float32)
            k_nd = (k_nd.to(tl.float32) * k_s_n[:, None]).to(q_gd.dtype)
        qk_gn = mma(q_gd, tl.trans(k_nd), tl.zeros([BLOCK_G, BLOCK_N], tl.float32),
                    UPCAST, PRECISION) * qk_scale_log2
        qk_gn = tl.where(token_ok_n[None, :], qk_gn, float("-inf"))

        m_new_g = tl.maximum(m_g, tl.max(qk_gn, 1))  # finite: every step has a valid key
        alpha_g = tl.exp2(m_g - m_new_g)
        p_gn = tl.exp2(qk_gn - m_new_g[:, None])
        l_g = l_g * alpha_g + tl.sum(p_gn, 1)
        rows_v_n = pages_n.to(tl.int64) * stride_vblk + (tokens_n % PAGE_SIZE) * stride_vslot
        v_nd = load_tile(v_base + rows_v_n[:, None] + dims_d[None, :], token_ok_n, dims_d,
                         True, HEAD_DIM, BLOCK_D)
        if QUANT:
            v_s_n = tl.load(v_scale_base + rows_s_n, mask=token_ok_n, other=0.0).to(tl.float32)
            v_nd = (v_nd.to(tl.float32) * v_s_n[:, None]).to(q_gd.dtype)
        acc_gd = mma(p_gn.to(v_nd.dtype), v_nd, acc_gd * alpha_g[:, None], UPCAST, PRECISION)
        m_g = m_new_g

    # An empty split (or context_len 0) saw no key: out 0, lse -inf.
    seen_g = l_g > 0
    l_safe_g = tl.where(seen_g, l_g, 1.0)
    out_gd = tl.where(seen_g[:, None], acc_gd / l_safe_g[:, None], 0.0)
    lse_g = tl.where(seen_g, (m_g + tl.log2(l_safe_g)) * 0.6931471805599453, float("-inf"))  # ln 2
    tl.store(out_ptr + split * stride_os + seq * stride_ob + heads_g[:, None] * stride_oh
             + dims_d[None, :], out_gd.to(out_ptr.dtype.element_ty),
             mask=head_ok_g[:, None] & dim_ok_d[None, :])
    tl.store(lse_ptr + split * stride_ls + seq * stride_lb + heads_g * stride_lh, lse_g,
             mask=head_ok_g)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_context: int,
                       device: torch.device) -> int:
    """Enough splits for ~4 waves of programs, each split keeping >= 512 keys.

    max_context is an upper bound (block table width x page size), known without a sync;
    sequences shorter than it just get shorter splits.
    """
    num_sms = 4 if interpreting() or device.type != "cuda" else _num_sms(device.index or 0)
    wanted = triton.cdiv(4 * num_sms, max(1, batch * num_kv_heads))
    return max(1, min(wanted, triton.cdiv(max_context, 512), 64))


def paged_decode_attention(
    q_bhd: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
    *,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence over a paged KV cache.

    q_bhd [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (Hq % Hkv == 0; any
    strides with D contiguous; same dtype as q: bf16, fp16 or fp32). block_tables int32
    [B, max_blocks]: token j of sequence b lives in block block_tables[b, j // block_size], slot
    j % block_size; entries past the sequence's blocks are never read. context_lens int32 [B];
    0 gives out 0 and lse -inf. num_splits: KV splits per sequence (None: a heuristic).
    out [B, Hq, D] (default q's dtype) and lse_out [B, Hq] fp32 are optional destinations.
    kv_scales: a quantized cache (int8 or float8 elements, any dtype for q): (k_scale,
    v_scale), each [num_blocks, block_size, Hkv] (one scale per token and kv head, any float
    dtype, same strides for both); K/V are read as element * scale, in place.
    Returns (out [B, Hq, D], lse [B, Hq] fp32, natural log): the layout a cross-rank merge
    gathers as [P, B, Hq, D] and [P, B, Hq] (see merge_attention_partials).
    """
    if q_bhd.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("expected q [B, Hq, D] and k_cache = v_cache shape "
                         "[num_blocks, block_size, Hkv, D]")
    batch, num_q_heads, head_dim = q_bhd.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"cache head_dim {cache_head_dim} != q head_dim {head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads "
                         f"({num_kv_heads})")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must share one dtype")
    if kv_scales is None and q_bhd.dtype != k_cache.dtype:
        raise ValueError("q, k_cache and v_cache must share one dtype (or pass kv_scales)")
    if kv_scales is not None:
        k_scale, v_scale = kv_scales
        if k_cache.dtype not in _QUANT_DTYPES:
            raise ValueError(f"kv_scales needs an int8 or float8 cache, got {k_cache.dtype}")
        if k_scale.shape != k_cache.shape[:3] or k_scale.stride() != v_scale.stride() \
                or v_scale.shape != k_scale.shape:
            raise ValueError("k_scale and v_scale must be [num_blocks, block_size, Hkv] with "
                             "the same strides")
    else:
        k_scale = v_scale = q_bhd  # never read (QUANT off)
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError("block_tables must be [B, max_blocks] and context_lens [B]")
    if any(x.stride(-1) != 1 for x in (q_bhd, k_cache, v_cache)):
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if out is None:
        out = torch.empty_like(q_bhd)
    if lse_out is None:
        lse_out = torch.empty((batch, num_q_heads), dtype=torch.float32, device=q_bhd.device)
    if out.shape != q_bhd.shape or tuple(lse_out.shape) != (batch, num_q_heads):
        raise ValueError("out must be shaped like q and lse_out [B, Hq]")
    if out.stride(-1) != 1:
        raise ValueError("out needs a contiguous last (head_dim) dimension")
    if batch == 0:
        return out, lse_out

    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size,
                                        q_bhd.device)
    if num_splits == 1:
        part_out, part_lse = out, lse_out
        part_strides = (0, out.stride(0), out.stride(1), 0, lse_out.stride(0), lse_out.stride(1))
    else:
        part_out = torch.empty((num_splits, batch, num_q_heads, head_dim), dtype=torch.float32,
                               device=q_bhd.device)
        part_lse = torch.empty((num_splits, batch, num_q_heads), dtype=torch.float32,
                               device=q_bhd.device)
        part_strides = (*part_out.stride()[:3], *part_lse.stride())

    group_size = num_q_heads // num_kv_heads
    block_n = 32 if interpreting() else 64
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q_bhd, k_cache, v_cache, block_tables, context_lens, part_out, part_lse,
        k_scale, v_scale,
        softmax_scale * _LOG2E, group_size, num_splits,
        q_bhd.stride(0), q_bhd.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *(k_scale.stride() if kv_scales is not None else (0, 0, 0)),
        block_tables.stride(0),
        *part_strides,
        PAGE_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_G=max(16, next_pow2(group_size)), BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(head_dim)),
        num_warps=4, num_stages=2, QUANT=kv_scales is not None,
        **dot_flags(q_bhd.dtype),
    )
    if num_splits > 1:
        merge_attention_partials(part_out, part_lse.transpose(1, 2), out=out, lse_out=lse_out.t())
    return out, lse_out
