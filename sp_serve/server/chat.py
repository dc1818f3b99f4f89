"""POST /v1/chat/completions: messages through the chat template, `chat.completion` shapes."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import Response

from sp_serve.engine.protocol import TokenLogprob
from sp_serve.server.completions import format_prompt_logprobs
from sp_serve.server.generation import ChoiceResult, ChoiceUpdate, GenerationGroup
from sp_serve.server.prompts import encode_chat, resolve_max_tokens
from sp_serve.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobEntry,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from sp_serve.server.serving import MIN_LOGPROB, ServerContext, make_choices, respond


async def create_chat_completion(ctx: ServerContext, request: ChatCompletionRequest,
                                 raw_request: Request) -> Response:
    arrival = time.monotonic()
    ctx.check_model(request.model)
    ctx.check_healthy()
    messages = [m.for_template() for m in request.messages]
    prompt = await ctx.in_tokenizer_thread(encode_chat, ctx.tokenizer, messages,
                                           ctx.chat_template, request.add_generation_prompt)
    max_tokens_param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    max_tokens = resolve_max_tokens(len(prompt), request.requested_max_tokens, ctx.max_model_len,
                                    "messages", max_tokens_param)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    choices = make_choices(ctx, request_id, request, [prompt], [max_tokens], request.logprobs_k,
                           request.prompt_logprobs)
    group = GenerationGroup(ctx.engine, ctx.metrics, choices, len(prompt), arrival)
    formatter = ChatFormatter(request_id, ctx.model_name, ctx.token_text, len(choices),
                              request.prompt_logprobs)
    return await respond(group, formatter, raw_request, stream=bool(request.stream),
                         include_usage=request.include_usage,
                         continuous_usage=request.continuous_usage)


class ChatFormatter:
    def __init__(self, request_id: str, model: str, token_text: Callable[[int], str],
                 num_choices: int, prompt_logprobs: int | None = None) -> None:
        self._id = request_id
        self._model = model
        self._token_text = token_text
        self._num_choices = num_choices
        # vLLM's prompt_logprobs (one list for the response: every choice has the same prompt)
        self._prompt_k = prompt_logprobs

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        token = self._token_text(token_id)
        return TopLogprob(token=token, logprob=max(logprob, MIN_LOGPROB),
                          bytes=list(token.encode("utf-8")))

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> ChatLogprobs | None:
        if logprobs is None:
            return None
        content = []
        for entry in logprobs:
            chosen = self._top(entry.token_id, entry.logprob)
            content.append(ChatLogprobEntry(**chosen.model_dump(),
                                            top_logprobs=[self._top(t, lp) for t, lp in entry.top]))
        return ChatLogprobs(content=content)

    def _chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None
               ) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self._id, model=self._model, choices=choices, usage=usage)

    def prelude(self) -> list[ChatCompletionChunk]:
        # OpenAI's first chunk of each choice carries only the role.
        return [self._chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                          content=""))])
                for i in range(self._num_choices)]

    def chunk(self, update: ChoiceUpdate) -> ChatCompletionChunk | None:
        if not update.text and not update.logprobs and update.finish_reason is None:
            return None  # an unfinished UTF-8 character or a held-back stop-string prefix
        delta = DeltaMessage(content=update.text) if update.text else DeltaMessage()
        return self._chunk([ChatStreamChoice(
            index=update.index, delta=delta, logprobs=self._logprobs(update.logprobs),
            finish_reason=update.finish_reason, stop_reason=update.stop_reason)])

    def usage_chunk(self, usage: UsageInfo) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> ChatCompletionResponse:
        choices = [ChatChoice(index=r.index, message=ChatMessageOut(content=r.text),
                              logprobs=self._logprobs(r.logprobs), finish_reason=r.finish_reason,
                              stop_reason=r.stop_reason)
                   for r in results]
        prompt_logprobs = next((r.prompt_logprobs for r in results if r.prompt_logprobs), None)
        return ChatCompletionResponse(id=self._id, model=self._model, choices=choices, usage=usage,
                                      prompt_logprobs=format_prompt_logprobs(
                                          prompt_logprobs, self._prompt_k, self._token_text))
