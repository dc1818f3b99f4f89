"""RoPE on k fused with the paged KV-cache write.

One pass per token reads the new k and v once, rotates k (rotate-half / NeoX layout, the
Hugging Face Llama convention) and stores both into their cache slots; unfused this is a rotate
kernel, a cat, and two index_copy kernels, with k making three extra trips through memory.

The rotation rounds to the activation dtype after every multiply and add, exactly as the
eager torch expression x1*cos - x2*sin does in bf16/fp16, so the cache holds bitwise the same
values as the unfused path (HF's own numerics), not merely close ones.

Shape legend
    t  new tokens     h  kv heads     d  head_dim     f  d // 2 rotary frequencies
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._env import next_pow2


@triton.jit
def _round(x, DTYPE: tl.constexpr, IS_BF16: tl.constexpr):
    """Round an fp32 value to the activation dtype (nearest-even) and back, as eager torch does.

    bf16 is rounded by hand on the bits: the same instructions on a GPU, and the Triton CPU
    interpreter's own fp32 -> bf16 cast truncates (seen with triton 3.9), which would break the
    bitwise promise under test. fp16 and fp32 use the cast.
    """
    if IS_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rope_cache_kernel(
    k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, k_out_ptr,
    num_heads, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cos_t, stride_sin_t,
    stride_kc_blk, stride_kc_slot, stride_kc_h, stride_vc_blk, stride_vc_slot, stride_vc_h,
    stride_ko_t, stride_ko_h,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    ACT_DTYPE: tl.constexpr, IS_BF16: tl.constexpr, WRITE_K_OUT: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    heads_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok_h = heads_h < num_heads
    freqs_f = tl.arange(0, BLOCK_F)
    mask_hf = head_ok_h[:, None] & (freqs_f < HALF)[None, :]

    k_row_ptr = k_ptr + token * stride_kt + heads_h[:, None] * stride_kh + freqs_f[None, :]
    x1_hf = tl.load(k_row_ptr, mask=mask_hf, other=0.0).to(tl.float32)
    x2_hf = tl.load(k_row_ptr + HALF, mask=mask_hf, other=0.0).to(tl.float32)
    cos_f = tl.load(cos_ptr + token * stride_cos_t + freqs_f, mask=freqs_f < HALF,
                    other=0.0).to(tl.float32)[None, :]
    sin_f = tl.load(sin_ptr + token * stride_sin_t + freqs_f, mask=freqs_f < HALF,
                    other=0.0).to(tl.float32)[None, :]
    rot1_hf = _round(_round(x1_hf * cos_f, ACT_DTYPE, IS_BF16)
                     - _round(x2_hf * sin_f, ACT_DTYPE, IS_BF16), ACT_DTYPE, IS_BF16)
    rot2_hf = _round(_round(x2_hf * cos_f, ACT_DTYPE, IS_BF16)
                     + _round(x1_hf * sin_f, ACT_DTYPE, IS_BF16), ACT_DTYPE, IS_BF16)

    if WRITE_K_OUT:
        ko_ptr = k_out_ptr + token * stride_ko_t + heads_h[:, None] * stride_ko_h + freqs_f[None, :]
        tl.store(ko_ptr, rot1_hf.to(k_out_ptr.dtype.element_ty), mask=mask_hf)
        tl.store(ko_ptr + HALF, rot2_hf.to(k_out_ptr.dtype.element_ty), mask=mask_hf)
    if slot >= 0:  # slot -1: a padding token (e.g. a CUDA-graph batch) that owns no slot
        block = slot // block_size
        offset = slot % block_size
        kc_ptr = (k_cache_ptr + block * stride_kc_blk + offset * stride_kc_slot
                  + heads_h[:, None] * stride_kc_h + freqs_f[None, :])
        tl.store(kc_ptr, rot1_hf.to(k_cache_ptr.dtype.element_ty), mask=mask_hf)
        tl.store(kc_ptr + HALF, rot2_hf.to(k_cache_ptr.dtype.element_ty), mask=mask_hf)
        dims_d = tl.arange(0, BLOCK_D)
        mask_hd = head_ok_h[:, None] & (dims_d < 2 * HALF)[None, :]
        v_hd = tl.load(v_ptr + token * stride_vt + heads_h[:, None] * stride_vh + dims_d[None, :],
                       mask=mask_hd)
        tl.store(v_cache_ptr + block * stride_vc_blk + offset * stride_vc_slot
                 + heads_h[:, None] * stride_vc_h + dims_d[None, :],
                 v_hd.to(v_cache_ptr.dtype.element_ty), mask=mask_hd)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def rope_and_cache_kv(
    k_thd: torch.Tensor,
    v_thd: torch.Tensor,
    cos_tf: torch.Tensor,
    sin_tf: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    k_out: torch.Tensor | None = None,
) -> None:
    """Rotate k by RoPE and write k, v of new tokens into a paged cache.

    k_thd, v_thd [T, Hkv, D] (bf16/fp16/fp32, same dtype); cos_tf, sin_tf [T, D // 2] in that
    dtype (any extra unit dims squeezed: the [T, 1, D // 2] of RotaryEmbedding.cos_sin works as
    cos.squeeze(1)); slot_mapping int [T]: token t goes to block slot // block_size, offset
    slot % block_size; a negative slot skips the token. k_cache, v_cache [num_blocks,
    block_size, Hkv, D] (a flat [slots, Hkv, D] pool is its view(-1, block_size, Hkv, D)).
    k_out: optional [T, Hkv, D] that also receives the rotated k (for attention over the new
    tokens themselves, e.g. a ring prefill's own block).
    """
    num_tokens, num_heads, head_dim = k_thd.shape
    if v_thd.shape != k_thd.shape or v_thd.dtype != k_thd.dtype:
        raise ValueError("k and v must have the same shape and dtype")
    if k_thd.dtype not in _TL_DTYPES or head_dim % 2:
        raise ValueError("k must be bf16, fp16 or fp32 with an even head_dim")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != (
        num_heads, head_dim
    ):
        raise ValueError(f"caches must be [num_blocks, block_size, {num_heads}, {head_dim}]")
    cos_tf, sin_tf = cos_tf.reshape(num_tokens, -1), sin_tf.reshape(num_tokens, -1)
    if cos_tf.shape[1] != head_dim // 2 or sin_tf.shape != cos_tf.shape:
        raise ValueError(f"cos and sin must be [T, {head_dim // 2}]")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError("slot_mapping must be [T]")
    if k_out is not None and k_out.shape != k_thd.shape:
        raise ValueError("k_out must be shaped like k")
    tensors = (k_thd, v_thd, cos_tf, sin_tf, k_cache, v_cache) + ((k_out,) if k_out is not None
                                                                   else ())
    if any(x.stride(-1) != 1 for x in tensors):
        raise ValueError("all tensors need a contiguous last dimension")
    if num_tokens == 0:
        return

    block_h = min(next_pow2(num_heads), max(1, 2048 // next_pow2(head_dim)))
    ko = k_out if k_out is not None else k_thd  # placeholder pointer, never written
    _rope_cache_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        k_thd, v_thd, cos_tf, sin_tf, slot_mapping, k_cache, v_cache, ko,
        num_heads, k_cache.shape[1],
        k_thd.stride(0), k_thd.stride(1), v_thd.stride(0), v_thd.stride(1),
        cos_tf.stride(0), sin_tf.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        ko.stride(0), ko.stride(1),
        HALF=head_dim // 2, BLOCK_H=block_h, BLOCK_F=next_pow2(head_dim // 2),
        BLOCK_D=next_pow2(head_dim), ACT_DTYPE=_TL_DTYPES[k_thd.dtype],
        IS_BF16=k_thd.dtype == torch.bfloat16,
        WRITE_K_OUT=k_out is not None,
        num_warps=4,
    )
