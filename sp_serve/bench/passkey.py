"""Pass-key retrieval prompts (the needle-in-a-haystack test of Mohtashami & Jaggi, 2023):
a 5-digit key hidden at a chosen depth of repetitive filler text, and the question.

    ids = passkey_prompt(tokenizer, 4096, depth=0.5, key=71432)

With a chat template the prompt is one user message that asks the question before and after
the haystack and asks for the number only (SmolLM2-135M-Instruct finds far more keys so than
when only asked after, or when its answer is primed with "The pass key is"); without one it is
plain text ending in "The pass key is", for a base model to complete.
"""
from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

ASK_FIRST = "What is the pass key in the text below?\n\n"
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
COMPLETION_END = "\n\nWhat is the pass key? The pass key is"


def random_key(seed: int) -> int:
    return random.Random(seed).randint(10000, 99999)


def _encode(tokenizer: Any, haystack: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        message = {"role": "user", "content": ASK_FIRST + haystack + QUESTION}
        ids = tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # transformers 5 / 4
    return tokenizer.encode(haystack + COMPLETION_END)


def passkey_prompt(tokenizer: Any, num_tokens: int, depth: float, key: int) -> list[int]:
    """Token ids of a pass-key prompt of about num_tokens tokens (within one filler sentence
    group, ~25 tokens) with the key at `depth` (0: first, 1: last) of the haystack."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(key=key)
    per_filler = len(tokenizer.encode(FILLER * 10, add_special_tokens=False)) / 10
    overhead = len(_encode(tokenizer, INTRO + needle))
    fillers = max(0, round((num_tokens - overhead) / per_filler))
    before = round(depth * fillers)
    return _encode(tokenizer, INTRO + FILLER * before + needle + FILLER * (fillers - before))


def found_key(answer: str, key: int) -> bool:
    """Whether the first number in the answer is the key."""
    match = re.search(r"\d+", answer)
    return match is not None and match.group() == str(key)
