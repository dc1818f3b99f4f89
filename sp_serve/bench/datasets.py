"""Prompts for `sp-serve bench serve`: `random`, `long-doc` (a long/short mix),
`prefix-repetition` (N documents x M questions each, vLLM's dataset) and `jsonl`.

Prompts of an exact token length are built with the tokenizer: random word tokens (ids that
decode to a space and letters and encode back to themselves) are decoded to text, re-encoded,
and trimmed or topped up until the text encodes to the target length.
Without a tokenizer the prompt goes as a list of token ids, which the OpenAI completions API
accepts (vLLM, SGLang and sp-serve all do), so the length is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sp_serve.jsonl import iter_jsonl_objects

DATASETS = ("random", "long-doc", "prefix-repetition", "jsonl")
PROMPT_FORMATS = ("auto", "text", "token-ids")
# Token ids used when no tokenizer is known: inside every Llama/Mistral/Qwen vocabulary and
# clear of their special tokens (which sit at the very start or the very end).
_FALLBACK_ID_RANGE = (1000, 30000)


@dataclass
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int | None  # tokens, when known here; the server's usage report wins
    expected_output_len: int
    is_long: bool | None = None  # set by the long-doc dataset only


def load_tokenizer(name_or_path: str | None) -> Any | None:
    """A Hugging Face tokenizer from a local directory, or None when none is given."""
    if name_or_path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # what transformers raises
        raise ValueError(
            f"cannot load a tokenizer from {name_or_path!r} ({type(exc).__name__}: {exc}); pass "
            "--tokenizer DIR with tokenizer files, or leave it out to send token-id prompts"
        ) from None


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def resolve_prompt_format(prompt_format: str, tokenizer: Any | None) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {prompt_format!r}; choose one of {PROMPT_FORMATS}")
    if prompt_format == "auto":
        return "text" if tokenizer is not None else "token-ids"
    if prompt_format == "text" and tokenizer is None:
        raise ValueError(
            "text prompts of exact token lengths need a tokenizer: pass --tokenizer DIR, or "
            "--prompt-format token-ids"
        )
    return prompt_format


def _prompt_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids to build prompts from: not special, and each one a "word" (a space then letters)
    that encodes back to itself, so a run of them re-encodes to the same ids. Tokenizers whose
    single-token decode drops the leading space (SentencePiece) fall back to any token that
    round-trips alone; the caller's re-encode loop absorbs the rest."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    words = [(i, t) for i, t in zip(ids, texts) if len(t) > 1 and t[0] == " " and t[1:].isalpha()]
    plain = [(i, t) for i, t in zip(ids, texts) if t.strip() and "\ufffd" not in t]
    for candidates in (words, plain):
        if len(candidates) < 16:
            continue
        encoded = tokenizer([t for _, t in candidates], add_special_tokens=False)["input_ids"]
        stable = [i for (i, _), enc in zip(candidates, encoded) if list(enc) == [i]]
        if len(stable) >= 16:
            return np.array(stable)
    return np.array(ids)


class _TokenSource:
    """Random prompt token ids from a tokenizer's vocabulary (or the fallback range)."""

    def __init__(self, tokenizer: Any | None, rng: np.random.Generator):
        self.rng = rng
        if tokenizer is None:
            self.allowed = np.arange(*_FALLBACK_ID_RANGE)
        else:
            self.allowed = _prompt_token_ids(tokenizer)
        if len(self.allowed) == 0:
            raise ValueError("the tokenizer has no ordinary tokens to build prompts from")

    def sample(self, n: int) -> list[int]:
        return self.allowed[self.rng.integers(0, len(self.allowed), n)].tolist()


def _exact_length_text(
    tokenizer: Any, source: _TokenSource, target: int, tries: int = 10
) -> tuple[str, int]:
    """Text that encodes to `target` tokens; token boundaries move when ids are decoded and
    re-encoded, so iterate. Returns the text and its real length (target unless every try
    missed, which a sane tokenizer never does)."""
    ids = source.sample(target)
    for _ in range(tries):
        text = tokenizer.decode(ids)
        ids = encode(tokenizer, text)
        if len(ids) == target:
            return text, target
        ids = ids[:target] if len(ids) > target else ids + source.sample(target - len(ids))
    text = tokenizer.decode(ids)
    return text, len(encode(tokenizer, text))


def sample_lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    """Uniform integers in [mean (1 - r), mean (1 + r)], as vLLM's random dataset draws them."""
    low = max(1, int(np.floor(mean * (1 - range_ratio))))
    high = max(low, int(np.ceil(mean * (1 + range_ratio))))
    return rng.integers(low, high + 1, n).tolist()


def _check_lengths(**lengths: float) -> None:
    for name, value in lengths.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _build_prompt(
    length: int, tokenizer: Any | None, source: _TokenSource, prompt_format: str
) -> tuple[str | list[int], int]:
    if prompt_format == "token-ids":
        return source.sample(length), length
    return _exact_length_text(tokenizer, source, length)


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
    tokenizer: Any | None = None,
    prompt_format: str = "auto",
) -> list[SampleRequest]:
    """Prompts of random tokens, input_len (+- range_ratio) tokens long."""
    _check_lengths(
        num_prompts=num_prompts, random_input_len=input_len, random_output_len=output_len
    )
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    prompt_format = resolve_prompt_format(prompt_format, tokenizer)
    source = _TokenSource(tokenizer, rng)
    input_lens = sample_lengths(input_len, range_ratio, num_prompts, rng)
    output_lens = sample_lengths(output_len, range_ratio, num_prompts, rng)
    requests = []
    for in_len, out_len in zip(input_lens, output_lens):
        prompt, real_len = _build_prompt(in_len, tokenizer, source, prompt_format)
        requests.append(SampleRequest(prompt, real_len, out_len))
    return requests


def long_doc_requests(
    num_prompts: int,
    long_fraction: float,
    long_input_len: int,
    short_input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
    tokenizer: Any | None = None,
    prompt_format: str = "auto",
) -> list[SampleRequest]:
    """A mix of long documents and short questions, each request marked is_long, so the TTFT
    of short requests stuck behind long prefills can be reported on its own.

    Exactly round(num_prompts x long_fraction) requests are long, at seeded random positions.
    """
    _check_lengths(
        num_prompts=num_prompts,
        long_input_len=long_input_len,
        short_input_len=short_input_len,
        random_output_len=output_len,
    )
    if not 0 <= long_fraction <= 1:
        raise ValueError(f"--long-fraction must be in [0, 1], got {long_fraction}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    prompt_format = resolve_prompt_format(prompt_format, tokenizer)
    source = _TokenSource(tokenizer, rng)
    num_long = round(num_prompts * long_fraction)
    is_long = np.zeros(num_prompts, dtype=bool)
    is_long[rng.permutation(num_prompts)[:num_long]] = True
    output_lens = sample_lengths(output_len, range_ratio, num_prompts, rng)
    requests = []
    for long, out_len in zip(is_long.tolist(), output_lens):
        mean = long_input_len if long else short_input_len
        in_len = sample_lengths(mean, range_ratio, 1, rng)[0]
        prompt, real_len = _build_prompt(in_len, tokenizer, source, prompt_format)
        requests.append(SampleRequest(prompt, real_len, out_len, is_long=long))
    return requests


def prefix_repetition_requests(
    num_prompts: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    rng: np.random.Generator,
    tokenizer: Any | None = None,
    prompt_format: str = "auto",
) -> list[SampleRequest]:
    """vLLM's prefix-repetition dataset: num_prefixes random prefixes (documents) of prefix_len
    tokens, each followed by num_prompts / num_prefixes random suffixes (questions) of
    suffix_len tokens, in a seeded random order. With text prompts the two parts are encoded
    apart, so a prompt may be a token off where they meet."""
    _check_lengths(num_prompts=num_prompts, prefix_repetition_prefix_len=prefix_len,
                   prefix_repetition_suffix_len=suffix_len,
                   prefix_repetition_num_prefixes=num_prefixes,
                   prefix_repetition_output_len=output_len)
    if num_prompts % num_prefixes:
        raise ValueError(f"--num-prompts ({num_prompts}) must be a multiple of "
                         f"--prefix-repetition-num-prefixes ({num_prefixes}): each document gets "
                         "the same number of questions")
    prompt_format = resolve_prompt_format(prompt_format, tokenizer)
    source = _TokenSource(tokenizer, rng)
    requests = []
    for _ in range(num_prefixes):
        prefix, prefix_real = _build_prompt(prefix_len, tokenizer, source, prompt_format)
        for _ in range(num_prompts // num_prefixes):
            suffix, suffix_real = _build_prompt(suffix_len, tokenizer, source, prompt_format)
            requests.append(SampleRequest(prefix + suffix, prefix_real + suffix_real, output_len))
    return [requests[i] for i in rng.permutation(len(requests))]


def jsonl_requests(
    path: str | Path, num_prompts: int, default_output_len: int, tokenizer: Any | None = None
) -> list[SampleRequest]:
    """One JSON object per line: {"prompt": "text" or [token ids], "output_len": 128}.

    output_len is optional (default_output_len then). The first num_prompts lines are used;
    a shorter file is cycled through.
    """
    _check_lengths(num_prompts=num_prompts, output_len=default_output_len)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--dataset-path {str(path)!r} is not a file")
    example = '{"prompt": "...", "output_len": 128}'
    requests: list[SampleRequest] = []
    with path.open(encoding="utf-8") as f:
        for where, obj in iter_jsonl_objects(f.read().splitlines(), path, example):
            if "prompt" not in obj:
                raise ValueError(f'{where}: missing "prompt"; each line must look like {example}')
            prompt = obj["prompt"]
            if isinstance(prompt, str) and prompt:
                prompt_len = len(encode(tokenizer, prompt)) if tokenizer is not None else None
            elif (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
            ):
                prompt_len = len(prompt)
            else:
                raise ValueError(
                    f'{where}: "prompt" must be a non-empty string or a non-empty list of token ids'
                )
            output_len = obj.get("output_len", default_output_len)
            if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
                raise ValueError(f'{where}: "output_len" must be an int >= 1, got {output_len!r}')
            requests.append(SampleRequest(prompt, prompt_len, output_len))
    if not requests:
        raise ValueError(f"{path} holds no requests; write one JSON object per line like {example}")
    return [requests[i % len(requests)] for i in range(num_prompts)]
