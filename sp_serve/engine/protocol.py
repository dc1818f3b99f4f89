"""What the HTTP frontend needs from the engine: a narrow async interface.

The engine runs on rank 0; the frontend tokenizes, detokenizes, applies stop strings and fans
out n > 1 into n engine requests. Nothing here touches a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from sp_serve.engine.sampling import SamplingParams


class EngineUnavailable(RuntimeError):
    """The engine cannot serve this request now: it stopped (a rank died) or the server is
    shutting down. The frontend answers 503: the client may retry elsewhere."""


class RequestFailed(RuntimeError):
    """This request alone failed inside the engine (e.g. while sampling); it is freed and the
    engine goes on. The frontend answers 500 for this request only."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-k (token_id, logprob) at this position
    rank: int | None = None  # of token_id at this position (1: the most likely); prompt logprobs


@dataclass
class TokenDelta:
    """One engine step's output for one request."""

    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" (eos / stop_token_ids), "length", "abort"
    queue_time_s: float | None = None  # set on the first delta: arrival -> first scheduled
    # set on the first delta when SamplingParams.prompt_logprobs was: one per prompt token
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # set on the first delta: the prompt tokens the prefix cache held
    num_cached_tokens: int | None = None


# vLLM's buckets of vllm:iteration_tokens_total (tokens one engine step processed)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, over all ranks, 0..1
    num_preemptions: int = 0
    # Tokens per engine step (prompt tokens + decode tokens), as a histogram since start:
    # observations per ITERATION_TOKENS_BUCKETS bucket (not cumulative; the last is +Inf), sum.
    iteration_tokens_counts: tuple[int, ...] = (0,) * (len(ITERATION_TOKENS_BUCKETS) + 1)
    iteration_tokens_sum: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of those, found there
    kv_capacity_tokens: int = 0  # tokens the KV pools of all ranks hold together
    num_swapped: int = 0  # sequences whose KV is in the host pools now
    num_swapped_out: int = 0  # sequences copied to the host pools (cumulative)
    num_swapped_in: int = 0  # ... and back (cumulative)
    swapped_out_blocks: int = 0  # KV blocks copied to the host, over all ranks (cumulative)
    swapped_in_blocks: int = 0


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: object  # a transformers PreTrainedTokenizerBase

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[TokenDelta]:
        """Yields one TokenDelta per engine step that produced tokens; the last has finish_reason.

        Raises ValueError (before yielding) for a prompt the engine cannot take, e.g. longer
        than max_model_len; EngineUnavailable when it cannot serve now; RequestFailed when this
        request failed inside the engine. Cancelling the consumer (client disconnect) must call
        abort.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...
