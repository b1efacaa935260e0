"""Errors in OpenAI's format, ``{"error": {"message", "type", "param", "code"}}``, for every failure.

Handlers cover FastAPI's validation errors (bad JSON, wrong types, out-of-range values: 400, never
FastAPI's default 422 shape), HTTP errors from routing (404, 405), and anything unexpected (500).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanserve.types import SamplingParams

log = logging.getLogger("leanserve.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    """An error answer: HTTP status plus OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_value_error(e: ValueError) -> APIError:
    """SamplingParams' messages start with the field's name ("top_p must be in (0, 1], got 2")."""
    message = str(e)
    first = message.split(" ", 1)[0].rstrip(":")
    return invalid(message, first if first in _PARAMS else None, code="invalid_value" if first in _PARAMS else None)


_PARAMS = {f.name for f in dataclasses.fields(SamplingParams)} | {
    "prompt", "messages", "model", "echo", "suffix", "priority", "top_logprobs", "max_completion_tokens", "tools",
    "user", "stream", "stream_options"}


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic adds the union member or validator tag to a location, e.g. ("prompt", "str"); drop those
    parts = [p for p in parts if not re.fullmatch(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|"
                                                  r"[A-Z]\w*|literal\[.*\])", p)]
    return ".".join(parts) or None


def format_validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return invalid("the request body is not valid")
    err = errors[0]
    etype = err.get("type", "")
    if etype == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return invalid(f"the request body is not valid JSON{': ' + str(detail) if detail else ''}", code="invalid_json")
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, "):]
    param = _param(tuple(err.get("loc", ())))
    if param is None:
        m = re.match(r"([a-z_]+): ", msg)  # a model-level check names its field first
        if m:
            param, msg = m.group(1), msg[m.end():]
    if etype == "missing":
        message = f"{param} is required" if param else "the request body is missing"
        if param is None:
            return invalid("the request body is missing or empty: send a JSON object", code="invalid_json")
        return invalid(message, param, code="missing_required_parameter")
    if param is None and etype in ("model_attributes_type", "dict_type", "model_type"):
        return invalid("the request body must be a JSON object", code="invalid_json")
    got = ""
    if "input" in err and etype not in ("value_error", "assertion_error") and not isinstance(err["input"], dict | list):
        got = f" (got {err['input']!r})"[:200]
    more = f" ({len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return invalid(f"{param}: {msg}{got}{more}" if param else f"{msg}{more}", param,
                   code="invalid_value" if etype not in ("missing",) else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = format_validation_error(exc)
        ctype = request.headers.get("content-type", "")
        if err.code == "invalid_json" and ctype and "json" not in ctype:
            err.message += f" (the request was sent as {ctype.split(';')[0]}: send Content-Type: application/json)"
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError) -> JSONResponse:
        return from_value_error(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()
