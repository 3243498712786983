"""What the gateway needs from an attention replica: `generate(request)` streams the replica's
`protocol.messages.Chunk`s for one `GenerateRequest`, and `is_ready()`.

Two implementations live in the composition root (`cluster/serving/engine_clients.py`): a Serve handle to
the attention deployment (the cluster) and an in-process engine (single-process runs and fast
tests). The request and the chunks are the protocol's types end to end, so this package never
imports the engine and nothing is translated on the way.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from protocol.messages import Chunk, GenerateRequest, Refusal


class EngineError(Exception):
    """A request the replica refused (`refusal`: 400 naming the field, or 429/503 with a retry
    time), or a failure the gateway reports as such (a replica that died mid-request)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def transient_refusal(chunk: Chunk) -> Refusal:
    """A chunk that ended its request with a transient failure (`retry_after_s` set), as a 503."""
    return Refusal(503, f"{chunk.error}; retry the request", None, chunk.retry_after_s)


class EngineClient(abc.ABC):
    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Raises EngineError before the first chunk when the request is refused; closing the
        iterator early aborts the request and frees its KV."""

    @abc.abstractmethod
    async def is_ready(self) -> bool:
        """True when every replica and expert shard behind this client can serve."""
