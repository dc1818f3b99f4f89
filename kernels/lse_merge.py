"""Merge attention partials by log-sum-exp (ring steps, cross-rank decode, decode KV splits).

Each partial p attended to a disjoint set of keys K_p and returned o_p = softmax over K_p applied
to V, plus lse_p = log sum_{j in K_p} exp(s_j). Attention over the union of the K_p is then

    lse = log sum_p exp(lse_p)                     (computed as m + log sum_p exp(lse_p - m),
    o   = sum_p exp(lse_p - lse) * o_p              m = max_p lse_p, so nothing overflows)

A partial that saw no key has lse_p = -inf, so weight exp(-inf) = 0, and its o_p is not even
read (it may hold garbage). If every partial is -inf, m is -inf and we return o = 0, lse = -inf
instead of the NaN that -inf - -inf would give. All of it runs in fp32.

Shape legend
    p  partials   t  tokens (a decode batch is t = b)   h  q heads   d  head_dim
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._env import next_pow2
from ._tl_common import no_specialize


@triton.jit(**no_specialize("num_parts", "stride_op", "stride_ot", "stride_lp", "stride_lh",
                             "stride_lt", "stride_lout_h", "stride_lout_t"))
def _merge_kernel(
    o_ptr, lse_ptr, out_ptr, lse_out_ptr,
    num_parts, num_heads, head_dim,
    stride_op, stride_ot, stride_oh,
    stride_lp, stride_lh, stride_lt,
    stride_outt, stride_outh,
    stride_lout_h, stride_lout_t,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims_d = tl.arange(0, BLOCK_D)
    head_ok_h = heads_h < num_heads
    mask_hd = head_ok_h[:, None] & (dims_d < head_dim)[None, :]

    # Pass 1: the largest lse per head (lse values are tiny to re-read).
    lse_ptrs_h = lse_ptr + token * stride_lt + heads_h * stride_lh
    max_h = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for _ in range(num_parts):
        lse_h = tl.load(lse_ptrs_h, mask=head_ok_h, other=float("-inf")).to(tl.float32)
        max_h = tl.maximum(max_h, lse_h)
        lse_ptrs_h += stride_lp
    max_safe_h = tl.where(max_h == float("-inf"), 0.0, max_h)

    # Pass 2: weighted sum. Pointers advance per partial (64-bit) so p * stride cannot overflow.
    lse_ptrs_h = lse_ptr + token * stride_lt + heads_h * stride_lh
    o_ptrs_hd = o_ptr + token * stride_ot + heads_h[:, None] * stride_oh + dims_d[None, :]
    denom_h = tl.zeros([BLOCK_H], tl.float32)
    acc_hd = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for _ in range(num_parts):
        lse_h = tl.load(lse_ptrs_h, mask=head_ok_h, other=float("-inf")).to(tl.float32)
        weight_h = tl.exp(lse_h - max_safe_h)
        # Skip the read for empty partials: saves bandwidth and ignores their garbage.
        o_hd = tl.load(o_ptrs_hd, mask=mask_hd & (weight_h > 0)[:, None], other=0.0)
        acc_hd += weight_h[:, None] * o_hd.to(tl.float32)
        denom_h += weight_h
        lse_ptrs_h += stride_lp
        o_ptrs_hd += stride_op

    seen_h = denom_h > 0  # false only when every partial was -inf
    out_hd = tl.where(seen_h[:, None], acc_hd / tl.where(seen_h, denom_h, 1.0)[:, None], 0.0)
    lse_out_h = tl.where(seen_h, max_safe_h + tl.log(tl.where(seen_h, denom_h, 1.0)),
                         float("-inf"))
    tl.store(out_ptr + token * stride_outt + heads_h[:, None] * stride_outh + dims_d[None, :],
             out_hd.to(out_ptr.dtype.element_ty), mask=mask_hd)
    tl.store(lse_out_ptr + heads_h * stride_lout_h + token * stride_lout_t, lse_out_h,
             mask=head_ok_h)


def merge_attention_partials(
    o_pthd: torch.Tensor | Sequence[torch.Tensor],
    lse_pht: torch.Tensor | Sequence[torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P attention partials by log-sum-exp, in fp32.

    o_pthd:  [P, T, H, D] partial outputs (any float dtype), or a list of P [T, H, D].
    lse_pht: [P, H, T] natural-log lse (fp32 preferred), or a list of P [H, T]. -inf = no key.
    out:     optional [T, H, D] destination; its dtype is the output dtype (default: o's).
    lse_out: optional [H, T] fp32 destination for the merged lse.
    Returns (out [T, H, D], lse [H, T] fp32).

    These are the layouts `prefill_attention` returns, so ring steps can write their partials
    straight into slices o_buf[p], lse_buf[p] of one buffer (its `out=`/`lse_out=`). Any strides
    are accepted except on D, which must be contiguous. Cross-rank decode partials gathered as
    o [P, B, H, D] and lse [P, B, H] merge as (o, lse.transpose(1, 2)), and a [B, H] result
    is obtained with lse_out=lse_bh.t(); no copies. A list is stacked first (one copy).
    """
    if not isinstance(o_pthd, torch.Tensor):
        o_pthd = torch.stack(list(o_pthd))
    if not isinstance(lse_pht, torch.Tensor):
        lse_pht = torch.stack(list(lse_pht))
    if o_pthd.dim() != 4 or lse_pht.dim() != 3:
        raise ValueError(
            f"expected o [P, T, H, D] and lse [P, H, T], got {tuple(o_pthd.shape)} and "
            f"{tuple(lse_pht.shape)}"
        )
    num_parts, num_tokens, num_heads, head_dim = o_pthd.shape
    if tuple(lse_pht.shape) != (num_parts, num_heads, num_tokens):
        raise ValueError(
            f"lse shape {tuple(lse_pht.shape)} does not match o {tuple(o_pthd.shape)}: "
            f"expected [P, H, T] = {(num_parts, num_heads, num_tokens)}"
        )
    if out is None:
        out = torch.empty(o_pthd.shape[1:], dtype=o_pthd.dtype, device=o_pthd.device)
    if lse_out is None:
        lse_out = torch.empty((num_heads, num_tokens), dtype=torch.float32, device=o_pthd.device)
    if tuple(out.shape) != (num_tokens, num_heads, head_dim) or tuple(lse_out.shape) != (
        num_heads, num_tokens
    ):
        raise ValueError("out must be [T, H, D] and lse_out [H, T]")
    if o_pthd.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("o and out need a contiguous last (head_dim) dimension")
    if num_tokens == 0 or num_heads == 0:
        return out, lse_out

    block_d = next_pow2(head_dim)
    block_h = min(next_pow2(num_heads), max(1, 1024 // block_d))
    # Few tokens (decode): smaller head blocks so the grid still fills the device.
    while block_h > 1 and num_tokens * triton.cdiv(num_heads, block_h) < 512:
        block_h //= 2
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _merge_kernel[grid](
        o_pthd, lse_pht, out, lse_out,
        num_parts, num_heads, head_dim,
        o_pthd.stride(0), o_pthd.stride(1), o_pthd.stride(2),
        lse_pht.stride(0), lse_pht.stride(1), lse_pht.stride(2),
        out.stride(0), out.stride(1),
        lse_out.stride(0), lse_out.stride(1),
        BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=max(1, min(4, block_h * block_d // 256)),
    )
    return out, lse_out
