"""POST /v1/completions: prompts as text or token ids, OpenAI's `text_completion` shapes."""
from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import Response

from sp_serve.engine.protocol import TokenLogprob
from sp_serve.server.generation import ChoiceResult, ChoiceUpdate, GenerationGroup
from sp_serve.server.prompts import check_token_ids, encode_text, resolve_max_tokens
from sp_serve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
    PromptLogprobs,
    UsageInfo,
)
from sp_serve.server.serving import MIN_LOGPROB, ServerContext, make_choices, respond


def _prompt_ids(ctx: ServerContext, request: CompletionRequest) -> list[list[int]]:
    return [ids for _, ids in _prompts(ctx, request)]


def _prompts(ctx: ServerContext, request: CompletionRequest) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt: the text as sent, or the ids decoded (what echo shows)."""
    prompt = request.prompt
    # One prompt is a string or a list of ids; a batch is a list of either (validated shapes).
    single = isinstance(prompt, str) or not prompt or isinstance(prompt[0], int)
    batch = [prompt] if single else prompt
    prompts = []
    for item in batch:
        if isinstance(item, str):  # not empty, valid Unicode: the request model checked it
            prompts.append((item, encode_text(ctx.tokenizer, item, request.add_special_tokens)))
        else:
            check_token_ids(item, ctx.vocab_size, param="prompt")
            text = ctx.tokenizer.decode(item) if request.echo else ""
            prompts.append((text, list(item)))
    return prompts


def prompt_logprobs_k(request: CompletionRequest) -> int | None:
    """What the engine computes for the prompt: vLLM's prompt_logprobs, and with echo the same
    number of alternatives as the completion's logprobs (the larger when both are asked)."""
    echoed = request.logprobs if request.echo else None
    if echoed is None or request.prompt_logprobs is None:
        return request.prompt_logprobs if echoed is None else echoed
    return max(echoed, request.prompt_logprobs)


async def create_completion(ctx: ServerContext, request: CompletionRequest,
                            raw_request: Request) -> Response:
    arrival = time.monotonic()
    ctx.check_model(request.model)
    ctx.check_healthy()
    prompts = await ctx.in_tokenizer_thread(_prompts, ctx, request)
    prompt_ids = [ids for _, ids in prompts]
    max_tokens = [resolve_max_tokens(len(p), request.max_tokens, ctx.max_model_len, "prompt",
                                     "max_tokens") for p in prompt_ids]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    choices = make_choices(ctx, request_id, request, prompt_ids, max_tokens, request.logprobs,
                           prompt_logprobs_k(request))
    group = GenerationGroup(ctx.engine, ctx.metrics, choices, sum(map(len, prompt_ids)), arrival)
    echo = [prompts[c.index // (request.n or 1)] for c in choices] if request.echo else None
    formatter = CompletionFormatter(request_id, ctx.model_name, ctx.token_text, echo,
                                    request.logprobs, request.prompt_logprobs)
    return await respond(group, formatter, raw_request, stream=bool(request.stream),
                         include_usage=request.include_usage,
                         continuous_usage=request.continuous_usage)


def format_prompt_logprobs(entries: list[TokenLogprob | None] | None, k: int | None,
                           token_text: Callable[[int], str]) -> PromptLogprobs | None:
    """vLLM's prompt_logprobs: {token id: {logprob, rank, decoded_token}} per prompt position,
    the prompt's token and the top k; None when not asked for (k None)."""
    if k is None or entries is None:
        return None
    out: PromptLogprobs = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        position = {str(entry.token_id): PromptLogprob(
            logprob=max(entry.logprob, MIN_LOGPROB), rank=entry.rank,
            decoded_token=token_text(entry.token_id))}
        for rank, (token_id, logprob) in enumerate(entry.top[:k], 1):
            position.setdefault(str(token_id), PromptLogprob(
                logprob=max(logprob, MIN_LOGPROB), rank=rank, decoded_token=token_text(token_id)))
        out.append(position)
    return out


class CompletionFormatter:
    def __init__(self, request_id: str, model: str, token_text: Callable[[int], str],
                 echo: list[tuple[str, list[int]]] | None = None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> None:
        self._id = request_id
        self._model = model
        self._token_text = token_text
        self._text_offset: dict[int, int] = defaultdict(int)  # per choice, across chunks
        self._echo = echo  # per choice: (prompt text, prompt ids), sent before its first token
        self._echo_pending = set(range(len(echo))) if echo else set()
        self._k = logprobs  # the completion's logprobs (None: none)
        self._prompt_k = prompt_logprobs  # vLLM's prompt_logprobs field (None: not sent)

    def _entry(self, out: CompletionLogprobs, index: int, token_id: int, logprob: float | None,
               top_entries: list[tuple[int, float]] | None) -> None:
        token = self._token_text(token_id)
        top = None
        chosen = None if logprob is None else max(logprob, MIN_LOGPROB)
        if chosen is not None:
            # Keyed by text, so tokens that print alike (halves of a UTF-8 character) collide:
            # keep the likeliest. The chosen token is always listed, as in vLLM.
            top = {token: chosen}
            for top_id, top_logprob in top_entries or []:
                text = self._token_text(top_id)
                top[text] = max(top.get(text, MIN_LOGPROB), top_logprob)
        out.tokens.append(token)
        out.token_logprobs.append(chosen)
        out.top_logprobs.append(top)
        out.text_offset.append(self._text_offset[index])
        self._text_offset[index] += len(token)

    def _logprobs(self, index: int, logprobs: list[TokenLogprob] | None,
                  echoed: tuple[list[int], list[TokenLogprob | None] | None] | None = None
                  ) -> CompletionLogprobs | None:
        if self._k is None:
            return None
        out = CompletionLogprobs()
        if echoed is not None:  # the prompt first; its first token has no logprob (null)
            ids, entries = echoed
            for i, token_id in enumerate(ids):
                entry = entries[i] if entries is not None and i < len(entries) else None
                self._entry(out, index, token_id, None if entry is None else entry.logprob,
                            None if entry is None else entry.top[:self._k])
        for entry in logprobs or []:
            self._entry(out, index, entry.token_id, entry.logprob, entry.top)
        return out

    def _choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None,
                finish_reason: str | None, stop_reason: str | int | None,
                prompt_logprobs: list[TokenLogprob | None] | None) -> CompletionChoice:
        echoed = None
        if index in self._echo_pending:
            self._echo_pending.discard(index)
            prompt_text, prompt_ids = self._echo[index]
            text = prompt_text + text
            echoed = (prompt_ids, prompt_logprobs)
        return CompletionChoice(index=index, text=text,
                                logprobs=self._logprobs(index, logprobs, echoed),
                                finish_reason=finish_reason, stop_reason=stop_reason,
                                prompt_logprobs=format_prompt_logprobs(
                                    prompt_logprobs, self._prompt_k, self._token_text))

    def prelude(self) -> list[CompletionResponse]:
        return []

    def chunk(self, update: ChoiceUpdate) -> CompletionResponse | None:
        if (not update.text and not update.logprobs and update.finish_reason is None
                and update.index not in self._echo_pending):
            return None  # an unfinished UTF-8 character or a held-back stop-string prefix
        choice = self._choice(update.index, update.text, update.logprobs, update.finish_reason,
                              update.stop_reason, update.prompt_logprobs)
        return CompletionResponse(id=self._id, model=self._model, choices=[choice])

    def usage_chunk(self, usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(id=self._id, model=self._model, choices=[], usage=usage)

    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> CompletionResponse:
        choices = [self._choice(r.index, r.text, r.logprobs, r.finish_reason, r.stop_reason,
                                r.prompt_logprobs)
                   for r in results]
        return CompletionResponse(id=self._id, model=self._model, choices=choices, usage=usage)
