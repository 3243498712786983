"""OpenAI-style errors: one exception type for every refusal, rendered as OpenAI's error object.

`{"error": {"message", "type", "param", "code"}}` with the right HTTP status; 429 and 503 carry a
Retry-After header so clients back off instead of timing out, 401 a `WWW-Authenticate: Bearer`.
FastAPI's own validation errors are mapped here too, naming the parameter at fault in OpenAI's
dotted form (`messages[0].content`), and any unexpected exception is a JSON 500, never plain text.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol.messages import Chunk

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"WWW-Authenticate": 'Bearer realm="mimo-serve"'}
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def generation_failed(chunk: Chunk) -> APIError:
    """A request that failed inside its replica after it started: 503 with Retry-After when the
    failure is transient (`Chunk.retry_after_s`), else 500."""
    if chunk.retry_after_s is not None:
        message = f"generation failed: {chunk.error}; retry the request"
        return APIError(503, message, None, "generation_failed", chunk.retry_after_s)
    return APIError(500, f"generation failed: {chunk.error}", None, "generation_failed")


def _param_of(loc: tuple[Any, ...], body: Any, is_missing: bool) -> str | None:
    """The parameter an error's location names, in OpenAI's form: ("body", "messages", 0,
    "content", "str") -> "messages[0].content". Pydantic puts the union member it tried ("str",
    "list[str]", "literal[...]", a model's name) into the location; those parts are no keys of the
    request, so each part is kept only where it indexes the body (a missing field: the last part)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out, node = "", body
    for i, part in enumerate(parts):
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            out, node = f"{out}[{part}]", node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            out, node = f"{out}.{part}" if out else part, node[part]
        elif is_missing and i == len(parts) - 1 and isinstance(part, str):
            out = f"{out}.{part}" if out else part
    return out or None


def _first_error(errors: list[Any], body: Any) -> tuple[str | None, str]:
    """(param, message) of the first field at fault, at its most specific: a union reports one
    error per member it tried, and the one reaching deepest into the request says what is wrong
    (an unsupported content part rather than "content is not a string"); at equal depth, a value
    refused by a member whose type matched beats a type mismatch (`["ok", "\\udfff"]` is a list of
    strings with a bad string, not a list of integers)."""
    found = [(_param_of(tuple(e.get("loc", ())), body, e.get("type") == "missing"), e) for e in errors]
    if not found:
        return None, "invalid request"
    root = re.split(r"[.\[]", found[0][0] or "", maxsplit=1)[0]
    best: tuple[tuple[int, bool], str | None, str] | None = None
    for param, error in found:
        if (re.split(r"[.\[]", param or "", maxsplit=1)[0]) != root:
            continue
        depth = 0 if param is None else param.count(".") + param.count("[") + 1
        rank = (depth, not str(error.get("type", "")).endswith("_type"))
        if best is None or rank > best[0]:
            message = str(error.get("msg", "invalid request")).removeprefix("Value error, ")
            best = (rank, param, message)
    assert best is not None  # the first error's own root always matches
    return best[1], best[2]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            message = str(errors[0].get("msg", "invalid JSON"))
            return APIError(
                400, f"request body is not valid JSON: {message}", None, "invalid_json"
            ).response()
        param, message = _first_error(errors, exc.body)
        text = f"{param}: {message}" if param else message
        return APIError(400, text, param, "invalid_parameter").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not decode the body (too deep, a huge number)
            return APIError(
                400, f"request body is not valid JSON: {exc.detail}", None, "invalid_json"
            ).response()
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return APIError(500, f"internal error ({type(exc).__name__})", None, "internal_error").response()
