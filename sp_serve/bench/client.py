"""One streamed request to an OpenAI-compatible server, timed the way `vllm bench serve` times it.

TTFT is request sent -> first chunk carrying text; every later text chunk adds one inter-token
latency (ITL) gap; E2EL is sent -> last text chunk. Chunks without text (a chat role-only delta,
an empty finish chunk, the trailing usage chunk) are not tokens, so they add no zero-length
ITL. The output token count comes from the usage chunk (`stream_options.include_usage`) when the
server sends one; otherwise the caller counts with a tokenizer or falls back to text chunks.

ITL is one gap per text chunk, but a chunk can carry several tokens: a server holds back the
text of a token that ends inside a UTF-8 character (an emoji or CJK character split over
byte-fallback tokens) and skips empty deltas, so that chunk's gap spans several engine steps.
TBT (time between tokens) shares each gap among the tokens its chunk carries; see `_tbt_samples`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

ERROR_SNIPPET_CHARS = 300


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0  # the server's usage.prompt_tokens when reported
    output_tokens: int = 0  # the server's usage.completion_tokens; 0 when not reported
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when reported
    num_text_chunks: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds, one per text chunk after the first
    tbt: list[float] = field(default_factory=list)  # seconds, per token after the first chunk's
    latency: float = 0.0  # seconds, E2EL
    start_time: float = 0.0  # time.perf_counter() when the request was sent
    client_queue_time: float = 0.0  # waited for a --max-concurrency slot before sending
    generated_text: str = ""
    error: str = ""  # empty on success; "HTTP 400: {body...}" and the like otherwise
    is_long: bool | None = None


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_SNIPPET_CHARS else text[:ERROR_SNIPPET_CHARS] + "..."


def _usage_tokens(chunk: dict[str, Any]) -> int | None:
    """The chunk's running `usage.completion_tokens`, or None when it carries no usage."""
    usage = chunk.get("usage")
    count = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return count if isinstance(count, int) else None


def _tbt_samples(gap: float, tokens_now: int | None, tokens_before: int | None) -> list[float]:
    """A text chunk's gap since the previous text chunk, shared by the k tokens it carries: k
    samples of gap / k, k = completion_tokens now minus at the previous text chunk.

    The client asks for `stream_options.continuous_usage_stats` (vLLM's extension, which
    sp-serve serves too), so every chunk carries `usage` with the running completion_tokens
    including its own tokens; tokens in chunks without text between two text chunks (held back)
    count toward the next text chunk. A server that sends no per-chunk usage (only the final
    usage chunk, or none), or a text chunk missing it or following one missing it, falls back to
    one token per text chunk: TBT is then ITL. A count that did not advance also counts as one
    token (k >= 1): a server whose count runs ahead of its text (one that reads the request's
    running count, updates still queued included, as sp-serve did before it counted only the
    tokens streamed) leaves the next text chunk no new tokens.
    """
    k = 1
    if tokens_now is not None and tokens_before is not None:
        k = max(1, tokens_now - tokens_before)
    return [gap / k] * k


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choices[0].get("text") or ""


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    chat: bool,
    result: RequestResult,
) -> None:
    """Fills `result` as the stream arrives, so a timeout keeps what was measured so far."""
    texts: list[str] = []
    tokens_at_last: int | None = None  # completion_tokens as of the previous text chunk
    last = result.start_time = time.perf_counter()
    async with client.stream("POST", url, json=payload, headers=headers) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", errors="replace")
            result.error = f"HTTP {response.status_code}: {_snippet(body)}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, ": ping" comments, event: lines
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                result.error = f"malformed stream chunk: {_snippet(data)}"
                return
            if "error" in chunk:  # vLLM and sp-serve report mid-stream failures this way
                result.error = f"error in stream: {_snippet(json.dumps(chunk['error']))}"
                return
            if text := _chunk_text(chunk, chat):
                tokens_now = _usage_tokens(chunk)
                if result.num_text_chunks == 0:
                    result.ttft = now - result.start_time  # with the first chunk's other tokens
                else:
                    result.itl.append(now - last)
                    result.tbt += _tbt_samples(now - last, tokens_now, tokens_at_last)
                tokens_at_last = tokens_now
                result.num_text_chunks += 1
                last = now
                texts.append(text)
            if usage := chunk.get("usage"):
                result.output_tokens = usage.get("completion_tokens") or 0
                if usage.get("prompt_tokens") is not None:
                    result.prompt_len = usage["prompt_tokens"]
                details = usage.get("prompt_tokens_details") or {}
                if details.get("cached_tokens") is not None:
                    result.cached_tokens = details["cached_tokens"]
    result.generated_text = "".join(texts)
    result.latency = last - result.start_time
    if result.num_text_chunks == 0:
        result.error = "the stream ended without any text chunk, so there is no TTFT"
    else:
        result.success = True


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    chat: bool,
    timeout_s: float,
    prompt_len: int = 0,
) -> RequestResult:
    """Never raises for a request that fails: the failure is in the result's `error`."""
    result = RequestResult(prompt_len=prompt_len)
    try:
        await asyncio.wait_for(_stream(client, url, payload, headers, chat, result), timeout_s)
    except asyncio.TimeoutError:
        got = f"{result.num_text_chunks} text chunks" if result.num_text_chunks else "no token"
        result.error = f"timed out after {timeout_s:g} s (--request-timeout) with {got} received"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {_snippet(str(exc)) or 'connection failed'}"
    if result.error:
        result.success = False
    return result
