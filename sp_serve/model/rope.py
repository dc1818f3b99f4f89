"""Rotary position embedding at global positions, matching Hugging Face transformers exactly.

Shapes: t = tokens (flat, any order, possibly several sequences), h = heads, d = head_dim,
f = d // 2 rotary frequencies.

The inverse frequencies and the attention scaling (yarn's mscale) come from transformers' own
`ROPE_INIT_FUNCTIONS`, so every scaling type is computed the way HF computes it. cos/sin are
computed in float32 and cast to the activations' dtype before the rotation, as HF does.

Dynamic NTK: HF recomputes inv_freq from seq_len = max(position_ids) + 1 whenever that exceeds
max_position_embeddings (not original_max_position_embeddings), once per forward call. Here
every token carries its own `rope_len` (its sequence's total length after this step), so a rank
holding an arbitrary subset of a sequence rotates it exactly like HF does the whole sequence.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .spec import ModelSpec


def _hf_rope_config(spec: ModelSpec):
    """A transformers config carrying just what the RoPE init functions read."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1, hidden_size=spec.num_heads * spec.head_dim, intermediate_size=1,
        num_hidden_layers=1, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=spec.rope_parameters_dict,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # else "not in the vocabulary"
    )


class RotaryEmbedding:
    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.rope_type = spec.rope_type
        dim = spec.head_dim
        if self.rope_type == "default":
            # transformers' compute_default_rope_parameters, written out (it is a method of each
            # model's rotary class, not in ROPE_INIT_FUNCTIONS)
            exponent_f = torch.arange(0, dim, 2, dtype=torch.float) / dim
            inv_freq_f = 1.0 / (spec.rope_theta ** exponent_f)
            self.attention_scaling = 1.0
            self._hf_config = None
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            self._hf_config = _hf_rope_config(spec)
            self._init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
            inv_freq_f, self.attention_scaling = self._init_fn(self._hf_config, None)
        self.inv_freq_f = inv_freq_f.to(device=device, dtype=torch.float32)
        self._dynamic_cache: dict[int, Tensor] = {}

    def _dynamic_inv_freq(self, rope_len: int) -> Tensor:
        inv_freq_f = self._dynamic_cache.get(rope_len)
        if inv_freq_f is None:
            # HF passes seq_len as a 0-d int64 tensor, which makes the base arithmetic float32;
            # pass it the same way so the frequencies are bitwise the same.
            seq_len = torch.tensor(rope_len, dtype=torch.int64)
            inv_freq_f, _ = self._init_fn(self._hf_config, None, seq_len=seq_len)
            inv_freq_f = inv_freq_f.to(device=self.inv_freq_f.device, dtype=torch.float32)
            if len(self._dynamic_cache) > 4096:  # lengths only grow; keep the cache bounded
                self._dynamic_cache.clear()
            self._dynamic_cache[rope_len] = inv_freq_f
        return inv_freq_f

    def _inv_freq(self, positions_t: Tensor, rope_len_t: Tensor | None,
                  lengths: list[int] | None = None) -> Tensor:
        """[f] shared by all tokens, or [t, f] per token for dynamic NTK past the threshold."""
        if self.inv_freq_f.device != positions_t.device:  # the model moved after construction
            self.inv_freq_f = self.inv_freq_f.to(positions_t.device)
            self._dynamic_cache.clear()
        if self.rope_type != "dynamic" or positions_t.numel() == 0:  # a rank may get no tokens
            return self.inv_freq_f
        if rope_len_t is None:
            # One forward call over one sequence, as HF sees it.
            rope_len_t = (positions_t.max() + 1).expand(positions_t.shape)
        threshold = self.spec.max_position_embeddings
        # The distinct lengths: given by a caller that knows them on the host (the worker's
        # step metadata), else read from the device (a sync, once per forward pass).
        lengths = sorted(set(lengths)) if lengths is not None else torch.unique(rope_len_t).tolist()
        if lengths[-1] <= threshold:
            return self.inv_freq_f
        inv_freq_tf = self.inv_freq_f.expand(positions_t.shape[0], -1).clone()
        for length in lengths:
            if length > threshold:
                inv_freq_tf[rope_len_t == length] = self._dynamic_inv_freq(int(length))
        return inv_freq_tf

    def cos_sin(self, positions_t: Tensor, dtype: torch.dtype, rope_len_t: Tensor | None = None,
                rope_lengths: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [t, 1, f] in `dtype`; compute once per forward, reuse per layer.
        rope_lengths: the distinct values of rope_len_t, if known on the host."""
        inv_freq = self._inv_freq(positions_t, rope_len_t, rope_lengths)
        freqs_tf = positions_t[:, None].float() * inv_freq
        cos_tf = freqs_tf.cos()
        sin_tf = freqs_tf.sin()
        if self.attention_scaling != 1.0:
            cos_tf = cos_tf * self.attention_scaling
            sin_tf = sin_tf * self.attention_scaling
        return cos_tf.to(dtype)[:, None, :], sin_tf.to(dtype)[:, None, :]

    def apply(self, q_thd: Tensor, k_thd: Tensor, positions_t: Tensor,
              rope_len_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Rotates q [t, hq, d] and k [t, hkv, d] at global `positions_t`."""
        cos, sin = self.cos_sin(positions_t, q_thd.dtype, rope_len_t)
        return rotate(q_thd, cos, sin), rotate(k_thd, cos, sin)


def rotate(x_thd: Tensor, cos_t1f: Tensor, sin_t1f: Tensor) -> Tensor:
    """HF's x * cos + rotate_half(x) * sin, on half-width cos/sin (HF's two halves are equal).

    Bitwise equal to HF: x1*cos + (-x2)*sin == x1*cos - x2*sin in IEEE arithmetic.
    """
    half = x_thd.shape[-1] // 2
    x1 = x_thd[..., :half]
    x2 = x_thd[..., half:]
    return torch.cat((x1 * cos_t1f - x2 * sin_t1f, x2 * cos_t1f + x1 * sin_t1f), dim=-1)
