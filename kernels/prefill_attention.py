"""Prefill attention over packed variable-length sequences, returning out and lse.

FlashAttention-2-style forward: one program per (block of BLOCK_M queries, sequence, q head)
streams that sequence's keys in blocks of BLOCK_N with an online softmax, so the T x T score
matrix never exists. It returns the log-sum-exp of every query row as well, which is what lets
ring attention merge its per-step partials (see lse_merge.py).

GQA without copies: q head h reads kv head h // (Hq // Hkv) straight from k/v.

Causal masks are bottom-right aligned (as flash-attn >= 2.1): query i of a sequence with Lq
queries and Lk keys sees keys j <= i + Lk - Lq. With Lq == Lk that is the usual causal mask
(the ring's diagonal block); zigzag half-blocks are the Lq != Lk cases. A row that sees no key
returns out 0 and lse -inf.

Shape legend
    t  tokens packed over all sequences      h  heads          d  head_dim
    m  query rows of one block (BLOCK_M)     n  key columns of one block (BLOCK_N)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._env import interpreting, next_pow2
from ._tl_common import dot_flags, load_tile, mma, no_specialize

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    q_md, k_base, v_base, n0, rows_m, dims_d,
    m_m, l_m, acc_md,
    k_len, diag, qk_scale_log2, stride_kt, stride_vt,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One step of the online softmax over keys [n0, n0 + BLOCK_N)."""
    cols_n = n0 + tl.arange(0, BLOCK_N)
    cols64_n = cols_n.to(tl.int64)
    col_ok_n = cols_n < k_len
    k_nd = load_tile(k_base + cols64_n[:, None] * stride_kt + dims_d[None, :], col_ok_n, dims_d,
                     MASKED, HEAD_DIM, BLOCK_D)
    # Scores in log2 units: exp2 is the fast hardware exponential.
    qk_mn = mma(q_md, tl.trans(k_nd), tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                UPCAST, PRECISION) * qk_scale_log2
    if MASKED:
        visible_mn = col_ok_n[None, :]
        if CAUSAL:
            visible_mn = visible_mn & (cols_n[None, :] <= rows_m[:, None] + diag)
        qk_mn = tl.where(visible_mn, qk_mn, float("-inf"))

    m_new_m = tl.maximum(m_m, tl.max(qk_mn, 1))
    # A row with nothing visible yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_safe_m = tl.where(m_new_m == float("-inf"), 0.0, m_new_m)
    alpha_m = tl.exp2(m_m - m_safe_m)
    p_mn = tl.exp2(qk_mn - m_safe_m[:, None])
    l_m = l_m * alpha_m + tl.sum(p_mn, 1)
    v_nd = load_tile(v_base + cols64_n[:, None] * stride_vt + dims_d[None, :], col_ok_n, dims_d,
                     MASKED, HEAD_DIM, BLOCK_D)
    acc_md = mma(p_mn.to(v_nd.dtype), v_nd, acc_md * alpha_m[:, None], UPCAST, PRECISION)
    return m_new_m, l_m, acc_md


@triton.jit(**no_specialize("num_m_blocks", "stride_lh", "stride_lt",
                             alignment=("cu_q_ptr", "cu_k_ptr")))
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
    qk_scale_log2, group_size, num_m_blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lh, stride_lt,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Last query blocks first: under a causal mask they have the most keys, so the long
    # programs start early and the short ones fill the tail.
    block_m = num_m_blocks - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    m0 = block_m * BLOCK_M
    if m0 >= q_len:
        return
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    kv_head = head // group_size

    rows_m = m0 + tl.arange(0, BLOCK_M)
    dims_d = tl.arange(0, BLOCK_D)
    row_ok_m = rows_m < q_len
    mask_md = row_ok_m[:, None] & (dims_d < HEAD_DIM)[None, :]
    tokens64_m = (q_start + rows_m).to(tl.int64)
    q_md = load_tile(q_ptr + tokens64_m[:, None] * stride_qt + head * stride_qh + dims_d[None, :],
                     row_ok_m, dims_d, True, HEAD_DIM, BLOCK_D)

    # Query i sees keys j <= i + diag. Keys below full_end are visible to every row of this
    # block (no mask work); keys in [full_end, hi) need the mask; keys >= hi are never seen.
    diag = k_len - q_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(k_len, m0 + BLOCK_M + diag), 0)
        full_end = tl.maximum(tl.minimum(k_len, m0 + diag + 1), 0)
    else:
        hi = k_len
        full_end = k_len
    full_end = (full_end // BLOCK_N) * BLOCK_N

    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    m_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_m = tl.zeros([BLOCK_M], tl.float32)
    acc_md = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        m_m, l_m, acc_md = _attend_block(
            q_md, k_base, v_base, n0, rows_m, dims_d, m_m, l_m, acc_md,
            k_len, diag, qk_scale_log2, stride_kt, stride_vt,
            False, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
        )
    for n0 in range(full_end, hi, BLOCK_N):
        m_m, l_m, acc_md = _attend_block(
            q_md, k_base, v_base, n0, rows_m, dims_d, m_m, l_m, acc_md,
            k_len, diag, qk_scale_log2, stride_kt, stride_vt,
            True, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
        )

    seen_m = l_m > 0  # false for rows that saw no key: out 0, lse -inf
    l_safe_m = tl.where(seen_m, l_m, 1.0)
    out_md = tl.where(seen_m[:, None], acc_md / l_safe_m[:, None], 0.0)
    lse_m = tl.where(seen_m, (m_m + tl.log2(l_safe_m)) * 0.6931471805599453, float("-inf"))
    tl.store(out_ptr + tokens64_m[:, None] * stride_ot + head * stride_oh + dims_d[None, :],
             out_md.to(out_ptr.dtype.element_ty), mask=mask_md)
    tl.store(lse_ptr + head * stride_lh + tokens64_m * stride_lt, lse_m, mask=row_ok_m)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Launch shape by head_dim and dtype (H100-sized; small blocks under the interpreter)."""
    if interpreting():
        return PrefillConfig(32, 16, 4, 1)
    if dtype == torch.float32:  # twice the bytes per tile: halve the tiles
        return PrefillConfig(64, 32, 4, 2)
    if head_dim >= 128:
        return PrefillConfig(128, 64, 8, 3)
    if head_dim >= 64:
        return PrefillConfig(128, 64, 4, 3)
    return PrefillConfig(64, 64, 4, 2)


def prefill_attention(
    q_thd: torch.Tensor,
    k_thd: torch.Tensor,
    v_thd: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    *,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward. Returns (out [Tq, Hq, D], lse [Hq, Tq] fp32, natural log).

    q_thd [Tq, Hq, D], k_thd/v_thd [Tk, Hkv, D] with Hq % Hkv == 0; bf16, fp16 or fp32, all
    the same; any strides with D contiguous. cu_seqlens_q/k int32 [S + 1]: sequence s owns
    q rows cu_seqlens_q[s]:cu_seqlens_q[s+1] and k rows likewise; empty sequences are fine.
    max_seqlen_q must bound every q length (it sizes the grid; it is not checked, to avoid a
    device sync); max_seqlen_k is accepted for flash-attn parity and unused.
    causal: bottom-right aligned (query i sees keys j <= i + Lk - Lq).
    out / lse_out: optional destinations ([Tq, Hq, D] of any float dtype, [Hq, Tq] fp32, any
    strides with D contiguous), e.g. slices of a ring step's partial buffer. out defaults to q's
    dtype. config overrides the launch shape (tests, tuning).
    """
    del max_seqlen_k
    if q_thd.dim() != 3 or k_thd.dim() != 3 or v_thd.dim() != 3:
        raise ValueError("q, k, v must be [tokens, heads, head_dim]")
    num_q_tokens, num_q_heads, head_dim = q_thd.shape
    num_kv_heads = k_thd.shape[1]
    if k_thd.shape != v_thd.shape or k_thd.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k_thd.shape)} and v {tuple(v_thd.shape)} must match, with "
                         f"head_dim {head_dim} as q")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads "
                         f"({num_kv_heads})")
    if not (q_thd.dtype == k_thd.dtype == v_thd.dtype) or q_thd.dtype not in (
        torch.bfloat16, torch.float16, torch.float32
    ):
        raise ValueError("q, k, v must share one dtype out of bf16, fp16, fp32")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both be [num_seqs + 1]")
    if out is None:
        out = torch.empty_like(q_thd)
    if lse_out is None:
        lse_out = torch.empty((num_q_heads, num_q_tokens), dtype=torch.float32,
                              device=q_thd.device)
    if out.shape != q_thd.shape or tuple(lse_out.shape) != (num_q_heads, num_q_tokens):
        raise ValueError("out must be shaped like q and lse_out [Hq, Tq]")
    if any(x.stride(-1) != 1 for x in (q_thd, k_thd, v_thd, out)):
        raise ValueError("q, k, v and out need a contiguous last (head_dim) dimension")

    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_q_tokens == 0 or num_seqs == 0 or max_seqlen_q <= 0:
        return out, lse_out
    config = config or default_prefill_config(head_dim, q_thd.dtype)
    num_m_blocks = triton.cdiv(max_seqlen_q, config.block_m)
    _prefill_kernel[(num_m_blocks, num_seqs, num_q_heads)](
        q_thd, k_thd, v_thd, out, lse_out, cu_seqlens_q, cu_seqlens_k,
        softmax_scale * _LOG2E, num_q_heads // num_kv_heads, num_m_blocks,
        q_thd.stride(0), q_thd.stride(1), k_thd.stride(0), k_thd.stride(1),
        v_thd.stride(0), v_thd.stride(1),
        out.stride(0), out.stride(1), lse_out.stride(0), lse_out.stride(1),
        CAUSAL=causal, HEAD_DIM=head_dim,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_D=max(16, next_pow2(head_dim)),
        num_warps=config.num_warps, num_stages=config.num_stages,
        **dot_flags(q_thd.dtype),
    )
    return out, lse_out


