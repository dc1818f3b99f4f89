"""Llama-family causal LM (Llama 2/3/3.1, Mistral, Qwen2) for one device.

Shapes: t = tokens (flat: many sequences, any order, no batch dim), d = hidden size,
h / hq / hkv = heads, e = head_dim, i = MLP intermediate size, v = vocab.

Sequence parallelism and KV caching enter only through the attention callable: the model
projects q/k/v for the tokens it is given, rotates q/k at the tokens' global positions and asks
`attn(layer_idx, q_the, k_the, v_the)` for the attention output. The callable knows which
sequence each token belongs to, owns the KV cache and applies `spec.softmax_scale`.

For CPU speed the q/k/v projections are one matmul over a fused weight, and gate/up another;
the loader fills the fused weights from HF's separate tensors.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import RotaryEmbedding, rotate
from .spec import ModelSpec

# attn(layer_idx, q [t, hq, e] (RoPE applied), k [t, hkv, e] (RoPE applied), v [t, hkv, e])
#   -> o [t, hq, e]
AttentionFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def _empty(*shape: int, device, dtype) -> nn.Parameter:
    # No random init: every parameter is overwritten by the loader.
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device, dtype) -> None:
        super().__init__()
        self.weight = _empty(size, device=device, dtype=dtype)
        self.eps = eps

    def forward(self, x_td: Tensor) -> Tensor:
        # HF's order of operations: normalise in float32, cast back, then scale.
        dtype = x_td.dtype
        x_td = x_td.float()
        x_td = x_td * torch.rsqrt(x_td.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_td.to(dtype)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, device, dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = spec.q_size
        self.kv_size = spec.kv_size
        self.intermediate_size = spec.intermediate_size
        d, i = spec.hidden_size, spec.intermediate_size
        self.input_norm = RMSNorm(d, spec.rms_norm_eps, device, dtype)
        # rows: q (hq*e) | k (hkv*e) | v (hkv*e), as HF's q_proj, k_proj, v_proj stacked
        self.qkv_weight = _empty(spec.q_size + 2 * spec.kv_size, d, device=device, dtype=dtype)
        self.qkv_bias = (_empty(spec.q_size + 2 * spec.kv_size, device=device, dtype=dtype)
                         if spec.qkv_bias else None)
        self.o_weight = _empty(d, spec.q_size, device=device, dtype=dtype)
        self.o_bias = _empty(d, device=device, dtype=dtype) if spec.o_bias else None
        self.post_attention_norm = RMSNorm(d, spec.rms_norm_eps, device, dtype)
        # rows: gate (i) | up (i)
        self.gate_up_weight = _empty(2 * i, d, device=device, dtype=dtype)
        self.down_weight = _empty(d, i, device=device, dtype=dtype)

    def forward(self, x_td: Tensor, cos_t1f: Tensor, sin_t1f: Tensor, attn: AttentionFn) -> Tensor:
        t = x_td.shape[0]
        qkv_tn = F.linear(self.input_norm(x_td), self.qkv_weight, self.qkv_bias)
        q_tn, k_tn, v_tn = qkv_tn.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q_the = rotate(q_tn.view(t, self.num_heads, self.head_dim), cos_t1f, sin_t1f)
        k_the = rotate(k_tn.view(t, self.num_kv_heads, self.head_dim), cos_t1f, sin_t1f)
        # q/k come out of rotate() contiguous; make v so too, callables may write it to a cache
        v_the = v_tn.contiguous().view(t, self.num_kv_heads, self.head_dim)
        o_the = attn(self.layer_idx, q_the, k_the, v_the)
        # In place where the tensor is ours: on CPU every fresh large temporary costs page
        # faults, which shows in a one-thread comparison with HF.
        x_td = x_td.add_(F.linear(o_the.reshape(t, self.q_size), self.o_weight, self.o_bias))

        h_td = self.post_attention_norm(x_td)
        if h_td.is_cuda:
            gate_ti, up_ti = F.linear(h_td, self.gate_up_weight).chunk(2, -1)
        else:
            # MKL runs two half-width matmuls 10-20% faster than one fused at 16-64 tokens
            # (measured, one thread); the row halves of the fused weight are contiguous views.
            gate_ti = F.linear(h_td, self.gate_up_weight[:self.intermediate_size])
            up_ti = F.linear(h_td, self.gate_up_weight[self.intermediate_size:])
        act_ti = F.silu(gate_ti, inplace=True).mul_(up_ti)
        return x_td.add_(F.linear(act_ti, self.down_weight))


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or spec.dtype
        self.spec = spec
        self.embed_weight = _empty(spec.vocab_size, spec.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, idx, device, dtype) for idx in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, device, dtype)
        # Tied: the same Parameter object, so loading the embedding fills both.
        if spec.tie_word_embeddings:
            self.lm_head_weight = self.embed_weight
        else:
            self.lm_head_weight = _empty(spec.vocab_size, spec.hidden_size, device=device,
                                         dtype=dtype)
        self.rope = RotaryEmbedding(spec, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    # no_grad rather than inference_mode: inference tensors could not later be written into a
    # KV cache allocated outside inference mode.
    @torch.no_grad()
    def forward(self, input_ids_t: Tensor, positions_t: Tensor, attn: AttentionFn,
                rope_len_t: Tensor | None = None, rope_lengths: list[int] | None = None) -> Tensor:
        """Hidden states after the final norm, [t, d].

        input_ids_t, positions_t: [t] int64; positions are global (a token's index in its own
        sequence). rope_len_t: [t] total length of each token's sequence after this step; only
        dynamic-NTK RoPE reads it (None: max(positions_t) + 1 for all, i.e. one sequence).
        rope_lengths: rope_len_t's distinct values when the caller has them on the host (then
        dynamic RoPE reads nothing back from the device).
        """
        x_td = F.embedding(input_ids_t, self.embed_weight)
        cos_t1f, sin_t1f = self.rope.cos_sin(positions_t, x_td.dtype, rope_len_t, rope_lengths)
        for layer in self.layers:
            x_td = layer(x_td, cos_t1f, sin_t1f, attn)
        return self.norm(x_td)

    @torch.no_grad()
    def compute_logits(self, hidden_td: Tensor) -> Tensor:
        """float32 logits [t, v]; pass only the rows you sample from (e.g. last token)."""
        return F.linear(hidden_td, self.lm_head_weight).float()
