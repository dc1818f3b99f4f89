"""A tiny random-weight checkpoint in real Hugging Face format, for tests and demos.

transformers itself writes the checkpoint (model class + save_pretrained), so what we load is
exactly what a user downloads. The weights are random but scaled so that logits are far from
uniform: the gap between the top-1 and top-2 logit is large compared with the rounding
differences between two implementations, so greedy tokens can be compared across them.

The tokenizer is byte-level BPE (256 byte tokens, a few merges, special tokens) built with the
`tokenizers` library and saved as a PreTrainedTokenizerFast with a ChatML chat template.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from .cache import cache_root, cached_dir

TINY_VERSION = 1  # bump when the weights or tokenizer change; cached copies are rebuilt
SPECIAL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
# Two-character merges of common English bigrams, then a few longer ones built from them.
_BIGRAMS = ("th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as "
            "ou io le ve co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur").split()
_WORD_MERGES = (("Ġ", "t"), ("Ġ", "a"), ("Ġ", "s"), ("Ġ", "w"), ("Ġ", "o"), ("Ġ", "c"),
                ("Ġ", "b"), ("Ġ", "f"), ("Ġ", "m"), ("Ġ", "i"), ("Ġt", "he"), ("Ġa", "nd"),
                ("Ġo", "f"), ("Ġt", "o"))
NUM_MERGES = len(_BIGRAMS) + len(_WORD_MERGES)
VOCAB_SIZE = 256 + NUM_MERGES + len(SPECIAL_TOKENS)
SPECIAL_IDS = {token: 256 + NUM_MERGES + i for i, token in enumerate(SPECIAL_TOKENS)}

TINY_DEFAULT: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
)
# Scale of the output logits (their std over the vocabulary); see the module docstring.
LOGIT_SCALE = 8.0

_ARCHES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenizes to)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_tokenizer():
    """Byte-level BPE tokenizer: ids 0-255 are the bytes, then merges, then special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    merges = [(a, b) for a, b in (tuple(bigram) for bigram in _BIGRAMS)] + list(_WORD_MERGES)
    for a, b in merges:
        assert a in vocab and b in vocab and a + b not in vocab, (a, b)
        vocab[a + b] = len(vocab)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    assert len(vocab) == VOCAB_SIZE

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        # unk set explicitly: byte-level never needs it, but transformers 5 loads a qwen2
        # checkpoint's tokenizer as Qwen2Tokenizer, which otherwise adds "<|endoftext|>".
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False,
    )


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int, logit_scale: float = LOGIT_SCALE) -> None:
    """Overwrites every parameter from a seeded generator (independent of global RNG state).

    Linear weights ~ N(0, 1/fan_in) keep activations O(1) through the layers; norm weights and
    biases get noise so that a model ignoring them fails the comparison; lm_head is scaled so
    logits have std ~ logit_scale (clear greedy margins).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * torch.randn(param.shape, generator=gen)
        elif name.endswith(".bias"):
            value = 0.3 * torch.randn(param.shape, generator=gen)
        elif "embed_tokens" in name:
            value = torch.randn(param.shape, generator=gen)
        elif name == "lm_head.weight":
            value = torch.randn(param.shape, generator=gen) * (logit_scale / param.shape[1] ** 0.5)
        else:
            value = torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5
        param.copy_(value.to(param.dtype))


def build_hf_model(arch: str = "llama", seed: int = 0, **config_overrides: Any):
    """A transformers *ForCausalLM with TINY_DEFAULT sizes (overridable) and random weights."""
    import transformers

    if arch not in _ARCHES:
        raise ValueError(f"unknown tiny arch {arch!r}; use one of {', '.join(_ARCHES)}")
    config_name, model_name = _ARCHES[arch]
    settings = {**TINY_DEFAULT, **config_overrides}
    if "rope_parameters" not in config_overrides and (
            "rope_scaling" in config_overrides or "rope_theta" in config_overrides):
        settings.pop("rope_parameters")  # the caller uses the older spelling
    if settings["vocab_size"] < VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {VOCAB_SIZE} (the tiny tokenizer's size), "
                         f"got {settings['vocab_size']}")
    settings.setdefault("bos_token_id", SPECIAL_IDS["<s>"])
    settings.setdefault("eos_token_id", SPECIAL_IDS["</s>"])
    settings.setdefault("pad_token_id", SPECIAL_IDS["</s>"])
    config = getattr(transformers, config_name)(**settings)
    model = getattr(transformers, model_name)(config)  # ties lm_head to the embedding if asked
    randomize_weights_(model, seed)
    return model.to(torch.float32).eval()


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0,
                    ascii_only: bool = False, **overrides: Any) -> Path:
    """Writes config, safetensors weights, tokenizer and generation config into out_dir.

    ascii_only: the model never picks a byte >= 0x80 or a special token, so every generated
    token is one printable character. A random model otherwise emits bytes that rarely form
    valid UTF-8; a server holds such text back until a character completes, so a stream carries
    fewer text chunks than tokens and client-side TBT (one gap per chunk, as vLLM's bench
    measures it) spans several tokens. Benchmarks want one chunk per token. lm_head's rows for
    those tokens are zeroed (logit 0, while ~190 ASCII rows draw from N(0, LOGIT_SCALE^2));
    the compute is unchanged.
    """
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    model = build_hf_model(arch, seed, **overrides)
    if ascii_only:
        if model.config.tie_word_embeddings:
            raise ValueError("ascii_only needs an untied lm_head (tie_word_embeddings=False)")
        never = list(range(0x80, 0x100)) + list(SPECIAL_IDS.values())
        with torch.no_grad():
            model.lm_head.weight[never] = 0.0
    model.save_pretrained(out_dir)  # safetensors: transformers 5 dropped safe_serialization=False
    GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=[SPECIAL_IDS["</s>"], SPECIAL_IDS["<|im_end|>"]],
        pad_token_id=model.config.pad_token_id,
    ).save_pretrained(out_dir)
    # save_jinja_files=False: the chat template goes into tokenizer_config.json, where older
    # transformers and other tools look for it (transformers 5 writes chat_template.jinja)
    build_tokenizer().save_pretrained(out_dir, save_jinja_files=False)
    return out_dir


def default_model_dir() -> Path:
    """$SP_SERVE_CACHE/tiny-llama (default ~/.cache/sp-serve/tiny-llama), made on first use."""
    return cached_tiny_model(cache_root() / "tiny-llama", arch="llama", seed=0)


def cached_tiny_model(target: str | Path, **kwargs: Any) -> Path:
    """make_tiny_model(target, **kwargs), unless target already holds the one these arguments
    (defaults filled in) and this TINY_VERSION make: a stamp file records them (see cache.py).
    A non-empty target without a stamp is not touched (ValueError): it is not a cache of this
    function's."""
    bound = inspect.signature(make_tiny_model).bind(target, **kwargs)
    bound.apply_defaults()
    arguments = {k: v for k, v in bound.arguments.items() if k not in ("out_dir", "overrides")}
    want = {"version": TINY_VERSION, **arguments, **bound.arguments.get("overrides", {})}
    return cached_dir(target, "sp-serve-tiny.json", want, lambda out: make_tiny_model(out, **kwargs),
                      "tiny model")
