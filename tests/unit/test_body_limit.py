"""`gateway.middleware.BodyLimit`'s receive after the body: a failing server channel is a disconnect."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.middleware import BodyLimit


def test_a_receive_that_fails_after_the_body_reads_as_a_disconnect() -> None:
    """Catches every client that hangs up mid-stream under Serve (its receive raises
    TaskCancelledError) being logged as an unexpected server error with a traceback."""
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())  # the buffered body
        seen.append(await receive())  # listening for a disconnect, as a streaming response does

    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        raise RuntimeError("Task was cancelled")  # what Serve raises once the proxy cancels

    async def send(message: Any) -> None:
        raise AssertionError("nothing is sent here")

    asyncio.run(BodyLimit(app, 1024)({"type": "http", "method": "POST", "headers": []}, receive, send))
    assert seen == [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]
