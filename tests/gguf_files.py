"""Small GGUF files written in the tests, as llama.cpp's converter writes them.

A tiny random Hugging Face model (tiny.py, with its byte-level BPE tokenizer and ChatML
template) is written out under llama.cpp's tensor names, with q/k rows permuted for the llama
architecture as llama.cpp does, metadata under its keys, and matrices stored as F32, F16 or
Q8_0. So the same weights can be compared three ways: the original HF model, transformers'
own GGUF load, and sp-serve's conversion.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sp_serve.model.tiny import SPECIAL_IDS, build_hf_model, build_tokenizer

# HF architecture -> what llama.cpp writes as general.architecture. (It writes Mistral models as
# "llama" too, and transformers reads those back as Llama: the same network without a window.)
_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for its RoPE kernel (convert_hf_to_gguf.py's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, gguf_arch: str):
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{kind}"
                if key not in sd:
                    continue
                w = sd[key]
                if gguf_arch == "llama" and gg in ("attn_q", "attn_k"):
                    w = _permute(w, cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads)
                yield f"blk.{i}.{gg}.{kind}", w
    yield "output_norm.weight", sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]


def write_gguf(path: str | Path, arch: str = "llama", *, seed: int = 0, storage: str = "F32",
               gguf_arch: str | None = None, with_tokenizer: bool = True, **overrides):
    """Writes a tiny GGUF file; returns (path, the HF model it holds).

    storage: F32, F16 or Q8_0 for the matrices (norms stay F32, as llama.cpp keeps them).
    gguf_arch: override general.architecture (to write a file of an unsupported architecture)."""
    import gguf

    path = Path(path)
    model = build_hf_model(arch, seed, **overrides)
    cfg = model.config
    gguf_arch = gguf_arch or _GGUF_ARCH[arch]
    w = gguf.GGUFWriter(str(path), gguf_arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if with_tokenizer:
        tok = build_tokenizer()
        tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
        specials = set(SPECIAL_IDS.values())
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                           for i in range(len(tokens))])
        merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
        w.add_bos_token_id(SPECIAL_IDS["<s>"])
        w.add_eos_token_id(SPECIAL_IDS["</s>"])
        w.add_add_bos_token(False)
        w.add_chat_template(tok.chat_template)
    qtype = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
             "Q8_0": gguf.GGMLQuantizationType.Q8_0}[storage]
    for name, tensor in _tensors(model, gguf_arch):
        if tensor.ndim == 2 and storage == "F16":
            w.add_tensor(name, tensor.astype(np.float16))
        elif tensor.ndim == 2 and storage == "Q8_0":
            w.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, tensor.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


def hf_gguf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """Last-token logits from transformers' own GGUF load of the file (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
