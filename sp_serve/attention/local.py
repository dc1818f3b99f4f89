"""Single-device attention that also returns the log-sum-exp, for one sequence.

Every distributed algorithm here (ring prefill, sharded decode, cached-chunk attention) is made
of such local calls plus an lse merge. On CPU, torch's flash kernel for CPU returns lse; on CUDA,
flash-attn when installed, else the Triton kernels (sp_serve_kernels), else torch's flash SDPA op
(fp16/bf16) or its memory-efficient op (fp32, which the flash op does not support); flash-attn
too falls back to these for fp32.

Legend: t tokens, h heads (q heads unless said kv), d head_dim.
"""
from __future__ import annotations

import torch

from sp_serve.attention.merge import merge_partials

_NEG_INF = float("-inf")


def empty_partial(q_thd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, h, d = q_thd.shape
    return (torch.zeros(t, h, d, dtype=torch.float32, device=q_thd.device),
            torch.full((t, h), _NEG_INF, dtype=torch.float32, device=q_thd.device))


def attention_with_lse(
    q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor, causal: bool, scale: float,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """o [Tq, Hq, D] (q's dtype), lse [Tq, Hq] fp32. Causal only for Tq == Tk (a diagonal block).

    GQA: q head h reads kv head h // (Hq // Hkv). The Triton and flash-attn kernels read KV
    heads in place; the torch path repeats them here, locally, never before they travel.
    """
    tq, hq, d = q_thd.shape
    tk, hkv, _ = k_thd.shape
    if tq == 0 or tk == 0:
        o, lse = empty_partial(q_thd)
        return o.to(q_thd.dtype), lse
    assert not causal or tq == tk, "a causal block is a diagonal block"
    if backend == "triton":
        return _triton(q_thd, k_thd, v_thd, causal, scale)
    if backend == "flash-attn" and q_thd.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn(q_thd, k_thd, v_thd, causal, scale)
    group = hq // hkv
    if not causal and group > 1:
        # Full block: fold the query group into the query length, so no KV head is repeated.
        q_bhtd = q_thd.view(tq, hkv, group, d).permute(1, 2, 0, 3).reshape(1, hkv, group * tq, d)
        k_bhtd, v_bhtd = k_thd.transpose(0, 1)[None], v_thd.transpose(0, 1)[None]
        o_bhtd, lse_bht = _flash(q_bhtd, k_bhtd, v_bhtd, False, scale)
        o_thd = o_bhtd.view(hkv, group, tq, d).permute(2, 0, 1, 3).reshape(tq, hq, d)
        lse_th = lse_bht.view(hkv, group, tq).permute(2, 0, 1).reshape(tq, hq)
        return o_thd, lse_th
    if group > 1:
        k_thd = k_thd.repeat_interleave(group, dim=1)
        v_thd = v_thd.repeat_interleave(group, dim=1)
    o_bhtd, lse_bht = _flash(q_thd.transpose(0, 1)[None], k_thd.transpose(0, 1)[None],
                             v_thd.transpose(0, 1)[None], causal, scale)
    return o_bhtd[0].transpose(0, 1), lse_bht[0].transpose(0, 1)


def attention_over_pieces(
    q_thd: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor]], scale: float,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (non-causal) attention of q over the union of KV pieces [(k, v)], merged by lse."""
    if len(pieces) == 1:
        return attention_with_lse(q_thd, *pieces[0], False, scale, backend)
    parts = [attention_with_lse(q_thd, k, v, False, scale, backend) for k, v in pieces]
    return merge_partials(torch.stack([o.float() for o, _ in parts]), torch.stack([lse for _, lse in parts]))


def _flash(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return o, lse.float()
    if q.dtype == torch.float32:
        # The flash SDPA kernel has no fp32 build on CUDA; the memory-efficient one has, and
        # returns the lse too (padded along the queries on some versions: cut to length).
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)
        return out[0], out[1][..., :q.shape[-2]].float()
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, return_debug_mask=False, scale=scale)
    return out[0], out[1].float()


_UNIT_CU_SEQLENS: dict[torch.device, torch.Tensor] = {}


def _cu_seqlens(n: int, device: torch.device) -> torch.Tensor:
    """[0, n] int32 on `device`, made on the device (one small kernel): this runs per layer and
    per ring step, where a torch.tensor(list, device=cuda) would be a host-to-device copy each
    time. The [0, 1] it scales is copied once per device."""
    unit = _UNIT_CU_SEQLENS.get(device)
    if unit is None:
        unit = _UNIT_CU_SEQLENS[device] = torch.tensor([0, 1], dtype=torch.int32, device=device)
    return unit * n


def _triton(q_thd, k_thd, v_thd, causal: bool, scale: float):
    from sp_serve_kernels import prefill_attention
    tq, tk = q_thd.shape[0], k_thd.shape[0]
    o_thd, lse_ht = prefill_attention(q_thd, k_thd, v_thd, _cu_seqlens(tq, q_thd.device),
                                      _cu_seqlens(tk, q_thd.device), tq, tk, causal, scale)
    return o_thd, lse_ht.t()


def _flash_attn(q_thd, k_thd, v_thd, causal: bool, scale: float):
    from flash_attn import flash_attn_varlen_func
    tq, tk = q_thd.shape[0], k_thd.shape[0]
    o_thd, lse_ht, _ = flash_attn_varlen_func(
        q_thd, k_thd, v_thd, _cu_seqlens(tq, q_thd.device), _cu_seqlens(tk, q_thd.device), tq, tk,
        softmax_scale=scale, causal=causal, return_attn_probs=True)
    return o_thd, lse_ht.t().float()
