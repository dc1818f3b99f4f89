"""Llama-family model for one device: spec (config.json), RoPE, CausalLM, loader, tiny maker.

Sequence parallelism enters only through the attention callable passed to CausalLM.forward.
transformers is imported lazily (it costs about a second), only where a config, tokenizer or
RoPE scaling function is needed.
"""
from .llama import AttentionFn, CausalLM
from .loader import load_model, load_tokenizer
from .rope import RotaryEmbedding
from .spec import SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES, ModelSpec, load_spec
from .tiny import TINY_DEFAULT, default_model_dir, make_tiny_model

__all__ = [
    "AttentionFn", "CausalLM", "ModelSpec", "RotaryEmbedding", "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES", "TINY_DEFAULT", "default_model_dir", "load_model", "load_spec",
    "load_tokenizer", "make_tiny_model",
]
