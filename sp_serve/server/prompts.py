"""Prompts to token ids: plain text, token ids, chat messages; and the context-length check.

Tokenizing a long prompt takes a while (a million tokens: seconds), so the callers run these in
a worker thread to keep the event loop streaming other requests' tokens meanwhile.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jinja2

from sp_serve.server.errors import BadRequest


def load_chat_template(value: str | None) -> str | None:
    """A chat template given as a file path or as the Jinja text itself (as vLLM accepts it)."""
    if value is not None and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def _as_ids(result: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if isinstance(result, Mapping):
        result = result["input_ids"]
    return list(result)


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None,
                add_generation_prompt: bool = True) -> list[int]:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise BadRequest("This model's tokenizer has no chat template; use /v1/completions, "
                         "or start the server with a chat template.", param="messages")
    kwargs = {"chat_template": chat_template} if chat_template is not None else {}
    try:
        result = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs)
    # Everything the template raises comes from the messages it was given: raise_exception()
    # (roles must alternate...), a missing key, None content concatenated to a string.
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
        raise BadRequest(f"The chat template rejected the messages: {exc}",
                         param="messages") from exc
    return _as_ids(result)


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):  # fast on 1M ids
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise BadRequest(f"Token id {bad} is out of vocabulary (ids are 0..{vocab_size - 1}).",
                         param=param)


def resolve_max_tokens(prompt_len: int, max_tokens: int | None, max_model_len: int,
                       prompt_param: str, max_tokens_param: str) -> int:
    """max_tokens to ask the engine for; None means the rest of the context, as vLLM does.

    The messages are vLLM's word for word, so clients that parse them keep working.
    """
    if prompt_len == 0:
        raise BadRequest("The prompt is empty; send at least one token.", param=prompt_param)
    if prompt_len >= max_model_len:  # not even one token would fit after it
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {prompt_len} input tokens. Please reduce the length of the input "
            "messages.", param=prompt_param)
    if max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.", param=max_tokens_param)
    return max_tokens
