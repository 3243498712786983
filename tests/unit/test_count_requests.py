"""`CountRequests`, the API's request counter: one record per request with the route's path and the
status its response started with (500 when the app raised first), and a streamed body passed
through whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway.middleware import CountRequests


async def _stream(request: object) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    return StreamingResponse(chunks(), status_code=201, media_type="text/event-stream")


async def _boom(request: object) -> None:
    raise RuntimeError("the handler failed before answering")


def test_each_request_is_counted_once_by_route_and_status() -> None:
    """Catches a counter that misses streamed or failed requests, counts a stream once per chunk,
    records the URL instead of the route, or changes the streamed body."""
    records: list[tuple[str, int]] = []
    app = Starlette(routes=[Route("/v1/items/{item}", _stream), Route("/boom", _boom)])
    app.add_middleware(CountRequests, record=lambda route, status: records.append((route, status)))
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/v1/items/7").text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert client.get("/boom").status_code == 500
    assert client.get("/nowhere").status_code == 404
    assert records == [("/v1/items/{item}", 201), ("/boom", 500), ("unmatched", 404)]
