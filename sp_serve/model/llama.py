"""Llama-family causal LM (Llama 2/3/3.1, Mistral, Qwen2) for one device.

Shapes: t = tokens (flat: many sequences, any order, no batch dim), d = hidden size,
h / hq / hkv = heads, e = head_dim, i = MLP intermediate size, v = vocab.

Sequence parallelism and KV caching enter only through the attention callable: the model
projects q/k/v for the tokens it is given, rotates q/k at the tokens' global positions and asks
`attn(layer_idx, q_the, k_the, v_the)` for the attention output. The callable knows which
sequence each token belongs to, owns the KV cache and applies `spec.softmax_scale`.

For CPU speed the q/k/v projections are one matmul over a fused weight, and gate/up another;
the loader fills the fused weights from HF's separate tensors.

Tensor parallelism (Megatron-style) enters through the linear layers: with `TensorParallel`
of size T a rank holds its share of the heads (q/k/v rows, "column-parallel"; KV heads split
when there are at least T of them, else each rank keeps the one its query heads use, as vLLM
does), of the MLP (gate/up rows), the matching columns of o and down ("row-parallel": their
partial outputs are summed over the TP group, one all-reduce each per layer) and a slice of the
vocabulary for the embedding (looked up where owned, summed) and the LM head (logits gathered).
The attention callable sees only the rank's heads.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import RotaryEmbedding, rotate
from .spec import ModelSpec

# attn(layer_idx, q [t, hq, e] (RoPE applied), k [t, hkv, e] (RoPE applied), v [t, hkv, e])
#   -> o [t, hq, e]
AttentionFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


@dataclass
class TensorParallel:
    """This rank's share of a model split over a TP group of `size` ranks; `comm` sums
    (`all_reduce`) and gathers (`all_gather`) over the group (parallel/comm.py). The model is
    loaded before the process groups exist: `comm` is set once they do (every layer holds this
    same object)."""

    rank: int = 0
    size: int = 1
    comm: Any = None

    def check(self, spec: ModelSpec) -> None:
        """ValueError unless spec splits evenly over this group."""
        t = self.size
        problems = []
        if spec.num_heads % t:
            problems.append(f"its {spec.num_heads} attention heads")
        if spec.num_kv_heads % t and t % spec.num_kv_heads:
            problems.append(f"its {spec.num_kv_heads} KV heads (need a multiple or a divisor of "
                            f"{t}: KV heads are split, or replicated when there are fewer)")
        if spec.intermediate_size % t:
            problems.append(f"its MLP size {spec.intermediate_size}")
        if problems:
            raise ValueError(f"--tensor-parallel-size {t} does not divide {' and '.join(problems)}"
                             f"; use a tensor parallel size that does (1 always does) and put the "
                             "other ranks in --sp-size")

    def heads(self, spec: ModelSpec) -> tuple[int, int, int, int]:
        """(first query head, query heads, first KV head, KV heads) of this rank."""
        hq, hkv = spec.num_heads // self.size, max(1, spec.num_kv_heads // self.size)
        first_kv = (self.rank * hkv if spec.num_kv_heads >= self.size
                    else self.rank * spec.num_kv_heads // self.size)
        return self.rank * hq, hq, first_kv, hkv

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """(first row, rows) of this rank's vocabulary slice: ceil(v / T) rows each, the last
        ranks fewer (possibly none)."""
        return _slice_of(vocab_size, self.rank, self.size)

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec of this rank's share: its heads and MLP slice (vocabulary stays whole)."""
        _, hq, _, hkv = self.heads(spec)
        return replace(spec, num_heads=hq, num_kv_heads=hkv,
                       intermediate_size=spec.intermediate_size // self.size)

    def all_reduce(self, x: Tensor) -> Tensor:
        return x if self.size == 1 else self.comm.all_reduce(x)


def _slice_of(total: int, rank: int, size: int) -> tuple[int, int]:
    """(first, count) of rank's slice of `total` rows cut `size` ways: ceil(total / size) rows
    each, the last ranks fewer (possibly none)."""
    per = -(-total // size)
    first = min(total, rank * per)
    return first, min(total, first + per) - first


def _gather_slices(part_tv: Tensor, comm: Any, size: int, total: int) -> Tensor:
    """Every rank's `_slice_of` columns, all-gathered into [t, total]: the slices padded to one
    width for the collective, then cut back."""
    per = -(-total // size)
    gathered_ktv = comm.all_gather(F.pad(part_tv, (0, per - part_tv.shape[1]))[None])
    return gathered_ktv.permute(1, 0, 2).reshape(part_tv.shape[0], size * per)[:, :total]


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
    def __init__(self, spec: ModelSpec, layer_idx: int, device, dtype,
                 tp: TensorParallel | None = None) -> None:
        """spec: this rank's share (TensorParallel.local_spec); hidden size and norms whole."""
        super().__init__()
        self.tp = tp or TensorParallel()
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
        if self.tp.size == 1:
            x_td = x_td.add_(F.linear(o_the.reshape(t, self.q_size), self.o_weight, self.o_bias))
        else:  # row-parallel: sum the ranks' partial outputs, then the (whole) bias once
            out_td = self.tp.all_reduce(F.linear(o_the.reshape(t, self.q_size), self.o_weight))
            x_td = x_td.add_(out_td if self.o_bias is None else out_td.add_(self.o_bias))

        h_td = self.post_attention_norm(x_td)
        if h_td.is_cuda:
            gate_ti, up_ti = F.linear(h_td, self.gate_up_weight).chunk(2, -1)
        else:
            # MKL runs two half-width matmuls 10-20% faster than one fused at 16-64 tokens
            # (measured, one thread); the row halves of the fused weight are contiguous views.
            gate_ti = F.linear(h_td, self.gate_up_weight[:self.intermediate_size])
            up_ti = F.linear(h_td, self.gate_up_weight[self.intermediate_size:])
        act_ti = F.silu(gate_ti, inplace=True).mul_(up_ti)
        return x_td.add_(self.tp.all_reduce(F.linear(act_ti, self.down_weight)))


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, tp: TensorParallel | None = None) -> None:
        """spec: the whole model's; tp: this rank's share of it (default: all of it)."""
        super().__init__()
        dtype = dtype or spec.dtype
        tp = tp or TensorParallel()
        tp.check(spec)
        self.spec, self.tp = spec, tp
        self.local_spec = tp.local_spec(spec)  # this rank's heads and MLP slice
        self.vocab_start, vocab_rows = tp.vocab(spec.vocab_size)
        self.embed_weight = _empty(vocab_rows, spec.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(self.local_spec, idx, device, dtype, tp) for idx in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, device, dtype)
        # Tied: the same Parameter object, so loading the embedding fills both.
        if spec.tie_word_embeddings:
            self.lm_head_weight = self.embed_weight
        else:
            self.lm_head_weight = _empty(vocab_rows, spec.hidden_size, device=device, dtype=dtype)
        self.rope = RotaryEmbedding(spec, device=device)

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights (a tied LM head counted once)."""
        seen = {id(p): p for p in self.parameters()}
        return sum(p.numel() * p.element_size() for p in seen.values())

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
        x_td = self._embed(input_ids_t)
        cos_t1f, sin_t1f = self.rope.cos_sin(positions_t, x_td.dtype, rope_len_t, rope_lengths)
        for layer in self.layers:
            x_td = layer(x_td, cos_t1f, sin_t1f, attn)
        return self.norm(x_td)

    def _embed(self, ids_t: Tensor) -> Tensor:
        if self.tp.size == 1:
            return F.embedding(ids_t, self.embed_weight)
        # vocabulary-parallel: each rank looks up the ids it owns (zeros elsewhere), summed
        rows = self.embed_weight.shape[0]
        local_t = ids_t - self.vocab_start
        owned_t = (local_t >= 0) & (local_t < rows)
        if rows:
            x_td = F.embedding(local_t.clamp(0, rows - 1), self.embed_weight)
            x_td = x_td.masked_fill_(~owned_t[:, None], 0)
        else:
            x_td = self.embed_weight.new_zeros(ids_t.shape[0], self.spec.hidden_size)
        return self.tp.all_reduce(x_td)

    @torch.no_grad()
    def compute_logits(self, hidden_td: Tensor, sp: tuple[int, int, Any] | None = None,
                       gather_tp: bool = True) -> Tensor:
        """float32 logits [t, v]; pass only the rows you sample from (e.g. last token). With
        TP every rank of the group must call it (it gathers the vocabulary slices).

        sp = (rank, size, comm): the ranks of an SP group, each holding the same rows (exactly:
        the caller's), split this rank's vocabulary rows among them and all-gather the slices
        (every one of them must call it): the LM head, a read of every vocabulary row each step,
        costs each rank 1/size of it instead of one rank all of it while the others wait.
        gather_tp=False: this rank takes no part in the TP gather (its SP slice is gathered on
        another TP group) and gets its TP slice's logits."""
        weight = self.lm_head_weight
        if sp is not None and sp[1] > 1:
            rank, size, comm = sp
            first, count = _slice_of(weight.shape[0], rank, size)
            # gathered in the model's dtype: half the bytes of float32 for bf16
            logits_tv = _gather_slices(F.linear(hidden_td, weight[first:first + count]), comm,
                                       size, weight.shape[0]).float()
        else:
            logits_tv = F.linear(hidden_td, weight).float()
        if self.tp.size == 1 or not gather_tp:
            return logits_tv
        return _gather_slices(logits_tv, self.tp.comm, self.tp.size, self.spec.vocab_size)
