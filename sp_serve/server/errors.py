"""HTTP errors in OpenAI's envelope, and the handlers that make every client mistake a 4xx.

OpenAI clients read `{"error": {"message", "type", "param", "code"}}`; `"object": "error"` is
kept alongside as vLLM sends it. Only a genuine bug in the server reaches the 500 handler.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
          413: "RequestTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    status_code = 500

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(APIError):
    status_code = 400


class NotFound(APIError):
    status_code = 404


class ServiceUnavailable(APIError):
    status_code = 503


class ClientDisconnected(Exception):
    """The client went away before its response was ready; nobody is left to answer."""


ECHO_CHARS = 80  # of a client's value quoted in an error message


def echo(value: str, limit: int = ECHO_CHARS) -> str:
    """A client's string as an error message quotes it: at most `limit` characters (a model
    name can be 100 KB), and printable in UTF-8 (a lone surrogate would fail the response)."""
    clipped = value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"
    return clipped.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, status_code: int, param: str | None = None) -> dict[str, Any]:
    return {
        "object": "error",
        "error": {
            # Messages quote exceptions too, which may quote the request: keep it encodable.
            "message": message.encode("utf-8", "backslashreplace").decode("utf-8"),
            "type": _TYPES.get(status_code, "APIError"),
            "param": param,
            "code": status_code,
        },
    }


def error_response(message: str, status_code: int, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status_code, param), status_code=status_code,
                        headers=headers)


def _field(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part != "body")


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic's error list as one readable sentence naming the field(s), and the first field."""
    for error in errors:
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", "malformed JSON")
            return f"The request body is not valid JSON: {reason}.", None
    parts = []
    for error in errors[:3]:
        field = _field(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        if error["type"] == "extra_forbidden":  # not silently ignored: say so, and what to do
            message = ("unknown field, or one sp-serve does not implement; remove it (fields "
                       "accepted without effect are listed in protocol.IGNORED_FIELDS)")
        elif field and error["type"] != "missing" and not isinstance(value, (dict, list)):
            message = f"{message} (got {echo(repr(value))})"
        parts.append(f"{field}: {message}" if field else message)
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    first = _field(errors[0]["loc"]) if errors else None
    return "; ".join(parts), first or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc.message, exc.status_code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        # FastAPI answers 422; OpenAI and vLLM answer 400, which is what clients handle.
        message, param = describe_validation_errors(list(exc.errors()))
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        # Keeps the exception's headers: a 405 must say which methods are allowed (Allow).
        return error_response(str(exc.detail), exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    app.add_middleware(InternalErrorMiddleware)


class InternalErrorMiddleware:
    """Answers an unexpected exception with the 500 envelope. Starlette's handler for Exception
    would answer too, but then re-raise, and uvicorn closes the connection under whatever the
    client sent next on it: one failing request would fail its neighbours."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            logger.exception("internal error serving %s %s", scope["method"], scope["path"])
            if started:  # mid-body: the status is sent, only closing the connection is left
                raise
            response = error_response(f"Internal server error: {type(exc).__name__}: {exc}", 500)
            await response(scope, receive, send)
