"""The OpenAI-compatible HTTP frontend (vLLM-flavoured), built on EngineClient only.

Routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health,
/metrics. The engine sees token ids and SamplingParams (n=1); tokenizing, chat templates,
detokenization, stop strings and n-way fan-out all happen here.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from sp_serve.engine.protocol import EngineClient
from sp_serve.server.chat import create_chat_completion
from sp_serve.server.completions import create_completion
from sp_serve.server.errors import BadRequest, error_response, install_error_handlers
from sp_serve.server.metrics import ServerMetrics
from sp_serve.server.openapi import error_responses, install_openapi
from sp_serve.server.prompts import check_token_ids, encode_chat, encode_text, load_chat_template
from sp_serve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from sp_serve.server.serving import ServerContext
from sp_serve.server.stream import token_text_lookup


def build_app(engine: EngineClient, *, served_model_name: str | None = None,
              chat_template: str | None = None,
              extra_model_info: dict | None = None) -> FastAPI:
    """The FastAPI app serving `engine`.

    served_model_name: the `model` clients must send (default engine.model_name).
    chat_template: Jinja text or a path to it, overriding the tokenizer's own.
    extra_model_info: shown under `sp_serve` in /v1/models (sp_size, attn_backend, ...).
    """
    model_name = served_model_name or engine.model_name
    ctx = ServerContext(
        engine=engine,
        model_name=model_name,
        metrics=ServerMetrics(engine, model_name),
        chat_template=load_chat_template(chat_template),
        extra_model_info=dict(extra_model_info or {}),
        token_text=token_text_lookup(engine.tokenizer),
    )
    app = FastAPI(title="sp-serve", description="Sequence-parallel LLM serving, OpenAI API")
    app.state.ctx = ctx
    install_error_handlers(app)
    install_openapi(app, model_name, ctx.vocab_size)
    generation_errors = error_responses(400, 404, 500, 503)

    @app.post("/v1/completions", response_model=None,
              responses={200: _json_or_sse(CompletionResponse), **generation_errors})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions", response_model=None,
              responses={200: _json_or_sse(ChatCompletionResponse), **generation_errors})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, root=engine.model_name,
                                         max_model_len=engine.max_model_len,
                                         sp_serve=ctx.extra_model_info)])

    @app.post("/tokenize", responses=error_responses(400, 404, 500))
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequest("Send exactly one of `prompt` or `messages`.", param="prompt")
        if body.prompt is not None:
            ids = await ctx.in_tokenizer_thread(encode_text, ctx.tokenizer, body.prompt,
                                                body.add_special_tokens)
        else:
            messages: list[dict[str, Any]] = [m.for_template() for m in body.messages]
            ids = await ctx.in_tokenizer_thread(encode_chat, ctx.tokenizer, messages,
                                                ctx.chat_template, body.add_generation_prompt)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)

    @app.post("/detokenize", responses=error_responses(400, 404, 500))
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(body.model)
        check_token_ids(body.tokens, ctx.vocab_size, param="tokens")
        text = await ctx.in_tokenizer_thread(ctx.tokenizer.decode, body.tokens)
        return DetokenizeResponse(prompt=text)

    @app.get("/health", response_class=Response,
             responses={200: {"description": "The engine and every rank are up (empty body).",
                              "content": {}}, **error_responses(503)})
    async def health() -> Response:
        if engine.is_healthy():
            return Response(status_code=200)
        return error_response("The engine is not healthy.", 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format.",
                              "content": {CONTENT_TYPE_LATEST.split(";")[0]: {
                                  "schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _json_or_sse(model: type) -> dict[str, Any]:
    """A 200 that is the JSON body, or with `"stream": true` server-sent events of chunks."""
    return {"model": model, "description": "The JSON response; with `stream` true, server-sent "
            "events (`data: {chunk}` lines, an error event if the request fails mid-stream, "
            "then `data: [DONE]`).",
            "content": {"text/event-stream": {"schema": {  # each event, as OpenAPI 3.1 has it
                "type": "object", "required": ["data"],
                "properties": {"data": {"type": "string", "description": "A chunk or an error "
                                        "envelope as JSON, or [DONE]."}}}}}}
