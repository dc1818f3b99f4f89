"""The engine requests behind one HTTP request, and their cleanup.

An HTTP request with n choices (times the prompts of a batch) becomes that many engine requests,
each consumed by its own task into one queue, so choices stream as their tokens come. The group
owns their lifetime: whatever ends the HTTP request early (a stop string, a client that
disconnects, an error) aborts every engine request not yet finished, at once, so its KV blocks
are freed instead of decoding to max_tokens for nobody.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from sp_serve.engine.protocol import EngineClient, EngineUnavailable, TokenDelta, TokenLogprob
from sp_serve.engine.sampling import SamplingParams
from sp_serve.server.errors import BadRequest, ClientDisconnected, ServiceUnavailable
from sp_serve.server.metrics import ServerMetrics
from sp_serve.server.stream import TextStream

logger = logging.getLogger(__name__)


@dataclass
class ChoiceUpdate:
    """What one engine step added to one choice, after detokenization and stop strings."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first update, if asked


@dataclass
class ChoiceResult:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: str | int | None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Choice:
    """One engine request: a prompt with its own SamplingParams (n=1) and request id."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    num_tokens: int = 0
    engine_done: bool = False  # the engine finished it, or we aborted it: nothing to free
    first_token_at: float | None = None
    last_token_at: float | None = None
    submitted_at: float | None = None  # handed to the engine (time.monotonic())
    scheduled_at: float | None = None  # first scheduled, as the engine reports its queue time
    prompt_index: int = 0  # which of the request's prompts (n choices share one)
    cached_tokens: int = 0  # of its prompt, found in the prefix cache

    def consume(self, delta: TokenDelta) -> ChoiceUpdate:
        pieces: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if delta.logprobs is not None else None
        finish_reason: str | None = None
        stop_reason: str | int | None = None
        for i, token_id in enumerate(delta.new_token_ids):
            token_ids.append(token_id)
            if logprobs is not None:
                logprobs.append(delta.logprobs[i])
            piece, matched = self.text.add_token(token_id)
            pieces.append(piece)
            if matched is not None:  # tokens after the stop string are dropped, not counted
                finish_reason, stop_reason = "stop", matched
                break
        if finish_reason is None and delta.finish_reason is not None:
            piece, matched = self.text.finish()
            pieces.append(piece)
            finish_reason = delta.finish_reason
            last_token = token_ids[-1] if token_ids else None
            if matched is not None:
                finish_reason, stop_reason = "stop", matched
            elif finish_reason == "stop" and last_token in self.params.stop_token_ids:
                stop_reason = last_token
        self.num_tokens += len(token_ids)
        return ChoiceUpdate(self.index, "".join(pieces), token_ids, logprobs, finish_reason,
                            stop_reason, delta.prompt_logprobs)


_CLOSED = object()  # queue item: the group was closed before every choice finished


class GenerationGroup:
    def __init__(self, engine: EngineClient, metrics: ServerMetrics, choices: list[Choice],
                 prompt_tokens: int, arrival: float) -> None:
        self.engine = engine
        self.metrics = metrics
        self.choices = choices
        self.prompt_tokens = prompt_tokens  # usage counts each prompt once, whatever n is
        self.arrival = arrival  # time.monotonic() when the HTTP request came in
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._watcher: asyncio.Task | None = None
        self._pending_first: Any = None
        self._closed = False

    async def start(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """Submits every choice and watches the connection; BadRequest if the engine refuses.

        `receive` is the ASGI receive of the HTTP request; its http.disconnect closes the group.
        """
        self._watcher = asyncio.create_task(self._watch_disconnect(receive))
        streams = []
        for i, choice in enumerate(self.choices):
            try:
                choice.submitted_at = time.monotonic()
                streams.append(self.engine.generate(choice.prompt_ids, choice.params,
                                                    choice.request_id))
            except ValueError as exc:  # refused: this one and the rest never reached the engine
                for never_submitted in self.choices[i:]:
                    never_submitted.engine_done = True
                await self.close()
                raise BadRequest(str(exc)) from exc
        self._tasks = [asyncio.create_task(self._run(c, s)) for c, s in zip(self.choices, streams)]
        prompts = len({tuple(c.prompt_ids) for c in self.choices}) or 1
        for _ in range(prompts):  # one observation per prompt: vLLM's request is one prompt
            self.metrics.request_params_n.observe(len(self.choices) // prompts)

    async def first(self) -> None:
        """Waits for the first output of any choice, so that a ValueError the engine raises
        before its first token (protocol: before yielding) is still answered as a 400.
        Streaming responses call this before sending their headers."""
        item = await self._queue.get()
        self._raise_if_error(item)
        self._pending_first = item

    @staticmethod
    def _raise_if_error(item: Any) -> None:
        if item is _CLOSED:
            raise ClientDisconnected()
        if isinstance(item, BaseException):
            raise item

    async def updates(self) -> AsyncIterator[ChoiceUpdate]:
        """Every choice's updates as they come, until all have finished."""
        remaining = len(self.choices)
        while remaining:
            if self._pending_first is not None:
                item, self._pending_first = self._pending_first, None
            else:
                item = await self._queue.get()
            self._raise_if_error(item)
            if item.finish_reason is not None:
                remaining -= 1
            yield item

    async def collect(self) -> list[ChoiceResult]:
        results = {c.index: ChoiceResult(c.index, "", [], None, None, None) for c in self.choices}
        async for update in self.updates():
            result = results[update.index]
            result.text += update.text
            result.token_ids += update.token_ids
            if update.logprobs is not None:
                result.logprobs = (result.logprobs or []) + update.logprobs
            result.finish_reason, result.stop_reason = update.finish_reason, update.stop_reason
            if update.prompt_logprobs is not None:
                result.prompt_logprobs = update.prompt_logprobs
        return [results[c.index] for c in self.choices]

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens found cached, each prompt once (like prompt_tokens): the fewest any of
        its n choices found (the first one computes what was not cached before the request;
        the others then share it, which is not a cache hit for the request)."""
        per_prompt: dict[int, int] = {}
        for c in self.choices:
            seen = per_prompt.get(c.prompt_index, c.cached_tokens)
            per_prompt[c.prompt_index] = min(seen, c.cached_tokens)
        return sum(per_prompt.values())

    async def _run(self, choice: Choice, stream: AsyncIterator[TokenDelta]) -> None:
        try:
            async for delta in stream:
                self._observe(choice, delta)
                update = choice.consume(delta)
                self._queue.put_nowait(update)
                if update.finish_reason is None:
                    continue
                if delta.finish_reason is None:  # a stop string: the engine must stop too
                    await self._abort(choice)
                choice.engine_done = True
                self.metrics.e2e_request_latency.observe(time.monotonic() - self.arrival)
                self.metrics.request_finished(update.finish_reason)
                self._observe_finished(choice)
                return
            raise RuntimeError(f"engine stream {choice.request_id} ended without a finish_reason")
        except ValueError as exc:
            if choice.num_tokens:  # the protocol allows ValueError only before the first token
                self._queue.put_nowait(exc)
                return
            choice.engine_done = True  # refused: nothing was admitted, nothing to abort
            self._queue.put_nowait(BadRequest(str(exc)))
        except EngineUnavailable as exc:  # stopped or shutting down: 503, try elsewhere
            message = str(exc)
            self._queue.put_nowait(ServiceUnavailable(
                f"{message[:1].upper()}{message[1:]}; retry on another replica."))
        except Exception as exc:  # noqa: BLE001 -- this request failed: the consumer answers 5xx
            if not self.engine.is_healthy():  # the engine died under us: 503, try elsewhere
                exc = ServiceUnavailable(f"The engine stopped: {type(exc).__name__}: {exc}")
            self._queue.put_nowait(exc)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _observe_finished(self, choice: Choice) -> None:
        """vLLM's per-request histograms, at its finish (times as vLLM defines them)."""
        m = self.metrics
        m.request_prompt_tokens.observe(len(choice.prompt_ids))
        m.request_generation_tokens.observe(choice.num_tokens)
        m.request_params_max_tokens.observe(choice.params.max_tokens)
        if choice.first_token_at is not None:
            scheduled = choice.scheduled_at if choice.scheduled_at is not None else self.arrival
            decode = choice.last_token_at - choice.first_token_at
            m.request_prefill_time.observe(max(0.0, choice.first_token_at - scheduled))
            m.request_decode_time.observe(decode)
            m.request_inference_time.observe(max(0.0, choice.last_token_at - scheduled))
            if choice.num_tokens > 1:
                m.time_per_output_token.observe(decode / (choice.num_tokens - 1))
        if all(c.engine_done for c in self.choices):
            m.request_max_num_generation_tokens.observe(max(c.num_tokens for c in self.choices))

    def _observe(self, choice: Choice, delta: TokenDelta) -> None:
        now = time.monotonic()
        if delta.queue_time_s is not None:
            self.metrics.request_queue_time.observe(delta.queue_time_s)
            if choice.submitted_at is not None:
                choice.scheduled_at = choice.submitted_at + delta.queue_time_s
        if delta.num_cached_tokens is not None:
            choice.cached_tokens = delta.num_cached_tokens
        if delta.new_token_ids:
            if choice.first_token_at is None:
                choice.first_token_at = now
                self.metrics.time_to_first_token.observe(now - self.arrival)
                self.metrics.prompt_tokens.inc(len(choice.prompt_ids))
            else:
                self.metrics.inter_token_latency.observe(now - choice.last_token_at)
            choice.last_token_at = now
            self.metrics.generation_tokens.inc(len(delta.new_token_ids))

    async def _abort(self, choice: Choice) -> None:
        try:
            await self.engine.abort(choice.request_id)
        except Exception:  # cleanup goes on for the other choices
            logger.exception("engine.abort(%s) failed", choice.request_id)

    async def _watch_disconnect(self, receive: Callable[[], Awaitable[dict]]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._closed:
            logger.info("client disconnected; aborting %s",
                        [c.request_id for c in self.choices if not c.engine_done])
        await self.close()

    async def close(self) -> None:
        """Aborts what is unfinished and stops the tasks; safe to call more than once.

        Shielded: it runs while the response is being cancelled (client gone), and an anyio
        cancel scope would otherwise cancel every await in here as well.
        """
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            unfinished = [c for c in self.choices if not c.engine_done]
            for choice in unfinished:  # first: the KV is freed before anything else happens
                await self._abort(choice)
            current = asyncio.current_task()
            tasks = [t for t in self._tasks if not t.done()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for choice in unfinished:
                choice.engine_done = True
                self.metrics.request_finished("abort")
            if self._watcher is not None and self._watcher is not current:
                self._watcher.cancel()
        self._queue.put_nowait(_CLOSED)
