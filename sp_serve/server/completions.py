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
    UsageInfo,
)
from sp_serve.server.serving import MIN_LOGPROB, ServerContext, make_choices, respond


def _prompt_ids(ctx: ServerContext, request: CompletionRequest) -> list[list[int]]:
    prompt = request.prompt
    # One prompt is a string or a list of ids; a batch is a list of either (validated shapes).
    single = isinstance(prompt, str) or not prompt or isinstance(prompt[0], int)
    batch = [prompt] if single else prompt
    prompts = []
    for item in batch:
        if isinstance(item, str):  # not empty, valid Unicode: the request model checked it
            prompts.append(encode_text(ctx.tokenizer, item, request.add_special_tokens))
        else:
            check_token_ids(item, ctx.vocab_size, param="prompt")
            prompts.append(list(item))
    return prompts


async def create_completion(ctx: ServerContext, request: CompletionRequest,
                            raw_request: Request) -> Response:
    arrival = time.monotonic()
    ctx.check_model(request.model)
    ctx.check_healthy()
    prompts = await ctx.in_tokenizer_thread(_prompt_ids, ctx, request)
    max_tokens = [resolve_max_tokens(len(p), request.max_tokens, ctx.max_model_len, "prompt",
                                     "max_tokens") for p in prompts]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    choices = make_choices(ctx, request_id, request, prompts, max_tokens, request.logprobs)
    group = GenerationGroup(ctx.engine, ctx.metrics, choices, sum(map(len, prompts)), arrival)
    formatter = CompletionFormatter(request_id, ctx.model_name, ctx.token_text)
    return await respond(group, formatter, raw_request, stream=bool(request.stream),
                         include_usage=request.include_usage)


class CompletionFormatter:
    def __init__(self, request_id: str, model: str, token_text: Callable[[int], str]) -> None:
        self._id = request_id
        self._model = model
        self._token_text = token_text
        self._text_offset: dict[int, int] = defaultdict(int)  # per choice, across chunks

    def _logprobs(self, index: int,
                  logprobs: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if logprobs is None:
            return None
        out = CompletionLogprobs()
        for entry in logprobs:
            token = self._token_text(entry.token_id)
            chosen = max(entry.logprob, MIN_LOGPROB)
            # Keyed by text, so tokens that print alike (halves of a UTF-8 character) collide:
            # keep the likeliest. The sampled token is always listed, as in vLLM.
            top = {token: chosen}
            for top_id, top_logprob in entry.top:
                text = self._token_text(top_id)
                top[text] = max(top.get(text, MIN_LOGPROB), top_logprob)
            out.tokens.append(token)
            out.token_logprobs.append(chosen)
            out.top_logprobs.append(top)
            out.text_offset.append(self._text_offset[index])
            self._text_offset[index] += len(token)
        return out

    def _choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None,
                finish_reason: str | None, stop_reason: str | int | None) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, logprobs=self._logprobs(index, logprobs),
                                finish_reason=finish_reason, stop_reason=stop_reason)

    def prelude(self) -> list[CompletionResponse]:
        return []

    def chunk(self, update: ChoiceUpdate) -> CompletionResponse | None:
        if not update.text and not update.logprobs and update.finish_reason is None:
            return None  # an unfinished UTF-8 character or a held-back stop-string prefix
        choice = self._choice(update.index, update.text, update.logprobs, update.finish_reason,
                              update.stop_reason)
        return CompletionResponse(id=self._id, model=self._model, choices=[choice])

    def usage_chunk(self, usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(id=self._id, model=self._model, choices=[], usage=usage)

    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> CompletionResponse:
        choices = [self._choice(r.index, r.text, r.logprobs, r.finish_reason, r.stop_reason)
                   for r in results]
        return CompletionResponse(id=self._id, model=self._model, choices=choices, usage=usage)
