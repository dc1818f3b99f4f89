"""A deterministic EngineClient for server tests: no model, no tensors, observable state.

Tokenizer: one token per UTF-8 byte (ids 0..255, so every non-ASCII character is split across
tokens) plus <|eos|> and ChatML markers, built with `tokenizers` and wrapped as a transformers
tokenizer with a chat template, like a real model's.
Generation: the UTF-8 bytes of `reply` (rotated by `seed` characters when sampling with a seed),
then eos; one token per step after a short "prefill" sleep. It honours max_tokens,
stop_token_ids, eos/ignore_eos and abort, and counts KV tokens per request so a test can see
that an aborted request's KV is freed.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sp_serve.engine.protocol import EngineStats, TokenDelta, TokenLogprob
from sp_serve.engine.sampling import SamplingParams

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FAKE_LOGPROB = -0.25


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def make_byte_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    byte_chars = _bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|eos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=chat_template)


@dataclass
class _Live:
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class FakeEngine:
    reply: str = "Hello, wörld! The quick brown fox ✓ jumps over the lazy dog."
    max_model_len: int = 512
    model_name: str = "fake/byte-model"
    prefill_s: float = 0.005
    step_s: float = 0.002
    kv_capacity_tokens: int = 100_000  # a prompt + max_tokens above this: ValueError
    crash_after_tokens: int | None = None  # raise RuntimeError mid-stream...
    crash_kills: bool = False  # ...and turn unhealthy (a dead rank) rather than stay up (a bug)
    healthy: bool = True
    num_preemptions: int = 0
    # The layout it reports, as AsyncEngine does (/metrics' cache_config_info labels): a world of
    # tp_size x sp_size ranks.
    sp_size: int = 1
    tp_size: int = 1
    block_size: int = 16
    tokenizer: PreTrainedTokenizerFast = field(default_factory=make_byte_tokenizer)
    # What tests look at:
    requests: list[tuple[str, list[int], SamplingParams]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (reason, tokens)
    kv_tokens: dict[str, int] = field(default_factory=dict)
    _live: dict[str, _Live] = field(default_factory=dict)
    _waiting: int = 0

    @property
    def cache_config(self) -> dict[str, str]:
        """AsyncEngine.cache_config's layout and capacity labels (vLLM's cache_config_info)."""
        return {"block_size": str(self.block_size),
                "kv_capacity_tokens_per_rank": str(self.kv_capacity_tokens // self.sp_size),
                "sp_size": str(self.sp_size), "tp_size": str(self.tp_size), "device": "cpu"}

    @property
    def kv_usage(self) -> float:
        return sum(self.kv_tokens.values()) / self.kv_capacity_tokens

    def _reply_ids(self, params: SamplingParams) -> list[int]:
        text = self.reply
        if params.seed is not None and not params.greedy:
            shift = params.seed % len(text)
            text = text[shift:] + text[:shift]
        return list(text.encode("utf-8"))

    def _logprob(self, token_id: int, k: int) -> TokenLogprob:
        top = [(token_id, FAKE_LOGPROB)] + [((token_id + j) % 256, FAKE_LOGPROB - j)
                                           for j in range(1, k)]
        return TokenLogprob(token_id, FAKE_LOGPROB, top[:k])

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[TokenDelta]:
        if len(prompt_token_ids) + params.max_tokens > self.kv_capacity_tokens:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens plus max_tokens="
                             f"{params.max_tokens} does not fit the KV cache "
                             f"({self.kv_capacity_tokens} tokens)")
        self.requests.append((request_id, list(prompt_token_ids), params))
        live = self._live[request_id] = _Live()
        arrival = time.monotonic()
        self._waiting += 1
        waiting = True
        generated = 0
        reason = "abort"
        try:
            await asyncio.sleep(self.prefill_s)
            self._waiting -= 1
            waiting = False
            if not live.aborted.is_set():
                self.kv_tokens[request_id] = len(prompt_token_ids)
            queue_time = time.monotonic() - arrival
            reply = self._reply_ids(params)
            eos = self.tokenizer.eos_token_id
            while True:
                if live.aborted.is_set():
                    yield TokenDelta([], finish_reason="abort")
                    return
                if self.crash_after_tokens is not None and generated >= self.crash_after_tokens:
                    self.healthy = self.healthy and not self.crash_kills
                    raise RuntimeError("fake engine crashed")
                position = generated % (len(reply) + 1)
                token = reply[position] if position < len(reply) else eos
                generated += 1
                self.kv_tokens[request_id] += 1
                finish = None
                if (token == eos and not params.ignore_eos) or token in params.stop_token_ids:
                    finish = "stop"
                elif generated >= params.max_tokens:
                    finish = "length"
                logprobs = (None if params.logprobs is None
                            else [self._logprob(token, params.logprobs)])
                yield TokenDelta([token], logprobs, finish,
                                 queue_time if generated == 1 else None)
                if finish is not None:
                    reason = finish
                    return
                await asyncio.sleep(self.step_s)
        finally:
            # Finished, aborted, or the consumer was cancelled (client gone): free the KV.
            if waiting:
                self._waiting -= 1
            self.kv_tokens.pop(request_id, None)
            self._live.pop(request_id, None)
            self.finished[request_id] = (reason, generated)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        live = self._live.get(request_id)
        if live is not None:
            live.aborted.set()
        self.kv_tokens.pop(request_id, None)  # abort frees the KV at once

    def is_healthy(self) -> bool:
        return self.healthy

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.kv_tokens), num_waiting=self._waiting,
                           kv_cache_usage=self.kv_usage, num_preemptions=self.num_preemptions)
