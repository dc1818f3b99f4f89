"""/openapi.json as the server really behaves, so that clients and fuzzers can trust it.

FastAPI documents validation errors as 422 with its own body; this server answers 400 with
OpenAI's envelope (what OpenAI and vLLM clients handle), so each operation's 422 is replaced by
the 400 envelope. The bounds that depend on the model being served are filled in here: the
`model` a request may name, and the largest token id.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from sp_serve.server.protocol import MODEL_MARK, TOKEN_ID_MARK, ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Route `responses=` for these error statuses, each with the envelope as its body."""
    what = {400: "Invalid request: the message names the field (`param`).",
            404: "Unknown model (`param` is `model`).",
            500: "This request failed inside the server; others are unaffected.",
            503: "The engine stopped or the server is shutting down; retry elsewhere."}
    return {code: {"model": ErrorResponse, "description": what[code]} for code in codes}


def install_openapi(app: FastAPI, model_name: str, vocab_size: int) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            for path_item in schema["paths"].values():
                for operation in path_item.values():
                    responses = operation["responses"]
                    if responses.pop("422", None) is not None:
                        responses.setdefault("400", {
                            "description": "Invalid request: the message names the field.",
                            "content": {"application/json": {"schema": ERROR_REF}}})
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            _fill_model_bounds(schema, model_name, vocab_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _fill_model_bounds(node: Any, model_name: str, vocab_size: int) -> None:
    """Token ids get `maximum`, request `model` fields the one served name (others are 404)."""
    if isinstance(node, list):
        for item in node:
            _fill_model_bounds(item, model_name, vocab_size)
        return
    if not isinstance(node, dict):
        return
    if node.pop(TOKEN_ID_MARK, False):
        node["maximum"] = vocab_size - 1
    if node.pop(MODEL_MARK, False):
        node["enum"] = [model_name]
    for value in node.values():
        _fill_model_bounds(value, model_name, vocab_size)
