"""Runs the n engine requests of one API call and merges their chunks in arrival order.

Every request's first chunk is awaited before the HTTP response starts, so a refusal (bad
parameter, overload) becomes a proper status code rather than an error inside a 200 stream. Closing
the merged stream (client gone) closes every engine stream, which aborts them and frees their KV.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.engine_client import EngineClient, GenerationChunk


@dataclass(frozen=True)
class EngineCall:
    index: int  # the choice index
    prompt_token_ids: list[int]
    params: dict[str, Any]
    request_id: str


class FanOut:
    def __init__(self, client: EngineClient, calls: list[EngineCall], salt: str | None) -> None:
        self._client = client
        self._calls = calls
        self._salt = salt
        self._streams: list[AsyncIterator[GenerationChunk]] = []
        self._firsts: list[GenerationChunk] = []

    async def start(self) -> None:
        """Submits every call and waits for each first chunk; raises the first refusal (EngineError)
        after closing whatever was already submitted."""
        try:
            for call in self._calls:
                stream = self._client.generate(
                    prompt_token_ids=call.prompt_token_ids,
                    salt=self._salt,
                    params=call.params,
                    request_id=call.request_id,
                )
                self._streams.append(stream)
            self._firsts = list(await asyncio.gather(*(anext(s) for s in self._streams)))
        except BaseException:
            await self.close()
            raise

    async def chunks(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """(choice index, chunk) in arrival order until every choice has finished."""
        queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, first: GenerationChunk, stream: AsyncIterator[GenerationChunk]) -> None:
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
