"""What completions and chat share: fan-out into engine requests, then a JSON or SSE response.

Streaming sends one SSE event per engine step and choice; a ValueError the engine raises before
its first token is still a 400 because the headers wait for the first output (which costs no
time to first token: the first event could not have been sent earlier anyway).
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from sp_serve.engine.protocol import EngineClient
from sp_serve.engine.sampling import SamplingParams
from sp_serve.engine.structured import StructuredOutputsParams
from sp_serve.server.errors import (
    APIError,
    BadRequest,
    ClientDisconnected,
    NotFound,
    ServiceUnavailable,
    echo,
    error_body,
)
from sp_serve.server.generation import Choice, ChoiceResult, ChoiceUpdate, GenerationGroup
from sp_serve.server.metrics import ServerMetrics
from sp_serve.server.protocol import MAX_N, SamplingRequest, UsageInfo
from sp_serve.server.stream import TextStream

logger = logging.getLogger(__name__)

T = TypeVar("T")
# -inf is not JSON; vLLM reports impossible tokens as -9999.0 too.
MIN_LOGPROB = -9999.0


@dataclass
class ServerContext:
    engine: EngineClient
    model_name: str  # the name clients send as `model`
    metrics: ServerMetrics
    chat_template: str | None
    extra_model_info: dict[str, Any]
    token_text: Callable[[int], str]
    _tokenizer_limiter: anyio.CapacityLimiter | None = field(default=None, init=False, repr=False)

    async def in_tokenizer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a tokenizer call off the event loop (long prompts take seconds), one at a time:
        a fast tokenizer whose settings change mid-call raises "Already borrowed" in another
        thread, and on a busy CPU parallel tokenization would only slow the engine down."""
        if self._tokenizer_limiter is None:  # created in the event loop, on first use
            self._tokenizer_limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._tokenizer_limiter)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return len(self.engine.tokenizer)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise NotFound(f"The model `{echo(model)}` does not exist.", param="model")

    def check_healthy(self) -> None:
        if not self.engine.is_healthy():
            raise ServiceUnavailable("The engine is not healthy; retry on another replica.")


class ResponseFormatter(Protocol):
    """OpenAI's shapes for one endpoint; the fan-out and streaming logic is shared."""

    def prelude(self) -> list[BaseModel]: ...

    def chunk(self, update: ChoiceUpdate) -> BaseModel | None: ...

    def usage_chunk(self, usage: UsageInfo) -> BaseModel: ...

    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> BaseModel: ...


# Request fields passed to SamplingParams as they are, unless unset (then its default holds).
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "min_tokens", "logit_bias",
                    "include_stop_str_in_output")


def sampling_params(request: SamplingRequest, max_tokens: int, sample: int,
                    logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """One engine request's parameters: n is fanned out here, so the engine always sees n=1;
    sample i of a seeded request draws with seed + i, so the n samples differ yet reproduce."""
    chosen = {name: getattr(request, name) for name in _SAMPLING_FIELDS}
    param = None
    try:
        structured = request.structured()
        if structured is not None:
            param, fields = structured
            chosen["structured_outputs"] = StructuredOutputsParams(**fields)
            param = None
    except ValueError as exc:
        raise BadRequest(str(exc), param=param or "structured_outputs") from exc
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            seed=None if request.seed is None else request.seed + sample,
            stop=list(request.stop),
            stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos,
            n=1,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            **{k: v for k, v in chosen.items() if v is not None},
        )
    except ValueError as exc:
        message = str(exc)
        param = next((name for name in _SAMPLING_FIELDS if message.startswith(name)), None)
        raise BadRequest(message, param=param) from exc


def make_choices(ctx: ServerContext, request_id: str, request: SamplingRequest,
                 prompts: list[list[int]], max_tokens: list[int],
                 logprobs: int | None, prompt_logprobs: int | None = None) -> list[Choice]:
    """Choice index = prompt index * n + sample, as OpenAI numbers a batch; engine request id
    `{id}-{index}`."""
    n = request.n or 1
    if len(prompts) * n > MAX_N:
        raise BadRequest(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; at most "
                         f"{MAX_N} per request.", param="n")
    choices = []
    for p, (prompt_ids, prompt_max_tokens) in enumerate(zip(prompts, max_tokens)):
        for sample in range(n):
            params = sampling_params(request, prompt_max_tokens, sample, logprobs,
                                     prompt_logprobs)
            index = p * n + sample
            choices.append(Choice(index, f"{request_id}-{index}", prompt_ids, params,
                                  TextStream(ctx.tokenizer, prompt_ids, params.stop,
                                             params.include_stop_str_in_output,
                                             params.min_tokens), prompt_index=p))
    return choices


def _event(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def respond(group: GenerationGroup, formatter: ResponseFormatter, request: Request, *,
                  stream: bool, include_usage: bool, continuous_usage: bool = False) -> Response:
    await group.start(request.receive)
    if not stream:
        try:
            results = await group.collect()
        finally:
            await group.close()
        usage = UsageInfo.of(group.prompt_tokens, group.completion_tokens, group.cached_tokens)
        body = formatter.response(results, usage).model_dump_json()
        return Response(body, media_type="application/json")
    try:
        await group.first()
    except BaseException:
        await group.close()
        raise
    return StreamingResponse(_sse(group, formatter, include_usage, continuous_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(group: GenerationGroup, formatter: ResponseFormatter,
               include_usage: bool, continuous_usage: bool = False) -> AsyncIterator[str]:
    streamed = 0  # completion tokens of the updates taken from the group so far

    def with_usage(chunk: Any) -> Any:
        # vLLM's continuous_usage_stats: every chunk carries the usage so far: the tokens of
        # the updates streamed up to it (a token whose text is held back counts with the next
        # chunk), not the group's running count, which may include updates still queued
        if continuous_usage:
            chunk.usage = UsageInfo.of(group.prompt_tokens, streamed, group.cached_tokens)
        return chunk

    try:
        for chunk in formatter.prelude():
            yield _event(with_usage(chunk))
        async for update in group.updates():
            streamed += len(update.token_ids)
            chunk = formatter.chunk(update)
            if chunk is not None:
                yield _event(with_usage(chunk))
        if include_usage:
            usage = UsageInfo.of(group.prompt_tokens, group.completion_tokens, group.cached_tokens)
            yield _event(formatter.usage_chunk(usage))
    except ClientDisconnected:
        return
    except APIError as exc:  # the status line is sent already: report it in the stream
        yield _event(error_body(exc.message, exc.status_code, exc.param))
    except Exception as exc:
        logger.exception("internal error while streaming")
        yield _event(error_body(f"Internal server error: {type(exc).__name__}: {exc}", 500))
    finally:
        await group.close()
    yield "data: [DONE]\n\n"
