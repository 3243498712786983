"""The ASGI layers around the API: the request counter, then the two checks every request passes
before its body is parsed: the API key, then the body size.

All three are plain ASGI (no Starlette `BaseHTTPMiddleware`, which relays every chunk of a streamed
response through a memory stream and a task: on the direct-streaming path that relay ran on the
engine's process and held the GIL beside the engine thread).

`BearerAuth` answers 401 (with `WWW-Authenticate: Bearer`) before anything is read, so a client
without a key learns nothing about what a valid body looks like; only `/health` and `/ready` are
public (the OpenAPI schema and docs too when no keys are set). `BodyLimit` reads the body itself,
counting chunked bodies as they arrive, and answers 413 once it passes the limit; the app then
reads the buffered body, and every later `receive` (disconnects) goes to the client as before.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import KeyStore
from gateway.errors import APIError

PUBLIC_PATHS = frozenset({"/health", "/ready"})


class CountRequests:
    """Calls `record(route path, status)` once per HTTP request, when its response starts (or with
    500 when the app raised before answering); the response's body passes through untouched."""

    def __init__(self, app: ASGIApp, record: Callable[[str, int], None]) -> None:
        self.app = app
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorded = False

        async def send_counted(message: Message) -> None:
            nonlocal recorded
            if not recorded and message["type"] == "http.response.start":
                recorded = True
                self.record(_route_path(scope), message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if not recorded:
                self.record(_route_path(scope), 500)


def _route_path(scope: Scope) -> str:
    return str(getattr(scope.get("route"), "path", "unmatched"))


class BearerAuth:
    """Puts the caller's `gateway.auth.Tenant` in `scope["state"]["tenant"]`, or answers 401."""

    def __init__(self, app: ASGIApp, keys: KeyStore) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        tenant = self.keys.authenticate(authorization)
        if tenant is None:
            refusal = APIError(
                401, "missing or invalid API key (Authorization: Bearer KEY)", None, "invalid_api_key"
            )
            await refusal.response()(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


class BodyLimit:
    """A body over `max_bytes` gets 413, declared (Content-Length) or counted while it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        too_big = APIError(413, f"request body exceeds {self.max_bytes} bytes", None, "body_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_big.response()(scope, receive, send)
            return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                await too_big.response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        buffered: Message | None = {"type": "http.request", "body": b"".join(parts), "more_body": False}

        async def replay() -> Message:
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            try:
                return await receive()
            except Exception:  # the server lost the client (Serve cancels the call): a disconnect,
                return {"type": "http.disconnect"}  # not an error of the request being answered

        await self.app(scope, replay, send)
