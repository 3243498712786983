"""Runs the n engine requests of one API call and merges their chunks in arrival order.

Every request's first chunk is awaited before the HTTP response starts, so a refusal (bad
parameter, overload), or a transient failure before any output (`Chunk.retry_after_s`), becomes a
proper status code rather than an error inside a 200 stream. Closing
the merged stream (client gone) closes every engine stream, which aborts them and frees their KV.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.engine_client import EngineClient, EngineError, transient_refusal
from protocol.messages import Chunk, GenerateRequest


@dataclass(frozen=True)
class EngineCall:
    index: int  # the choice index
    request: GenerateRequest


class FanOut:
    def __init__(self, client: EngineClient, calls: list[EngineCall]) -> None:
        self._client = client
        self._calls = calls
        self._streams: list[AsyncIterator[Chunk]] = []
        self._firsts: list[Chunk] = []

    async def start(self) -> None:
        """Submits every call and waits for each first chunk; raises the first refusal (EngineError)
        after closing whatever was already submitted."""
        try:
            for call in self._calls:
                self._streams.append(self._client.generate(call.request))
            self._firsts = list(await asyncio.gather(*(anext(s) for s in self._streams)))
            for first in self._firsts:  # failed transiently before any output: a 503, not a 200 stream
                if first.error is not None and first.retry_after_s is not None:
                    raise EngineError(transient_refusal(first))
        except BaseException:
            await self.close()
            raise

    async def chunks(self) -> AsyncIterator[tuple[int, Chunk]]:
        """(choice index, chunk) in arrival order until every choice has finished."""
        queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, first: Chunk, stream: AsyncIterator[Chunk]) -> None:
            try:
                await queue.put((index, first))
                if first.finish_reason is None:
                    async for chunk in stream:
                        await queue.put((index, chunk))
                        if chunk.finish_reason is not None:
                            break
                await queue.put((index, None))
            except Exception as e:  # delivered to the consumer, never lost
                await queue.put((index, e))

        tasks = [
            asyncio.create_task(pump(call.index, first, stream))
            for call, first, stream in zip(self._calls, self._firsts, self._streams, strict=True)
        ]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def close(self) -> None:
        for stream in self._streams:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):  # a stream that already failed has nothing to free
                    await aclose()
