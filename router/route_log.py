"""The state of the routers' shared guess board (`router.route_board`): recent placements, numbered.

Pure logic (no Ray): publishing appends a placement; a follower reads what came after its cursor,
skipping its own, or waits for the next placement by another router. A recreated board has a new
epoch, and a cursor from an old epoch reads from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_ENTRIES = 4096  # placements the board keeps (a router behind by more misses the oldest)


@dataclass(frozen=True)
class RouteEntry:
    seq: int  # 1, 2, ... within one board's life (`RouteLog.epoch`)
    router_id: str
    replica_id: str
    block_hashes: bytes  # packed native uint64 (`pack_hashes`)
    published_at: float  # time.time() on the board when published


def pack_hashes(hashes: Sequence[int]) -> bytes:
    return array("Q", hashes).tobytes()


def unpack_hashes(data: bytes) -> list[int]:
    packed = array("Q")
    packed.frombytes(data)
    return packed.tolist()


class RouteLog:
    """The last `max_entries` placements, numbered; followers read what came after their cursor."""

    def __init__(self, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.time) -> None:
        self.epoch = uuid.uuid4().hex
        self._entries: deque[RouteEntry] = deque(maxlen=max_entries)
        self._seq = 0
        self._clock = clock
        self._changed = asyncio.Event()

    def publish(self, router_id: str, replica_id: str, block_hashes: bytes) -> int:
        self._seq += 1
        self._entries.append(RouteEntry(self._seq, router_id, replica_id, block_hashes, self._clock()))
        self._changed.set()
        self._changed = asyncio.Event()  # waiters hold the old (set) event; later ones wait anew
        return self._seq

    def since(self, epoch: str, cursor: int, router_id: str) -> tuple[str, int, list[RouteEntry]]:
        """Entries after `cursor` not published by `router_id` -> (epoch, new cursor, entries). A
        cursor from another epoch (the board was recreated) reads from the start."""
        if epoch != self.epoch:
            cursor = 0
        skip = 0 if not self._entries else max(0, cursor + 1 - self._entries[0].seq)  # seqs are consecutive
        fresh = [e for e in itertools.islice(self._entries, skip, None) if e.router_id != router_id]
        return self.epoch, self._seq, fresh

    async def wait_since(
        self, epoch: str, cursor: int, router_id: str, timeout_s: float
    ) -> tuple[str, int, list[RouteEntry]]:
        """`since`, but waits up to `timeout_s` for an entry by another router."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.since(epoch, cursor, router_id)
            remaining = deadline - time.monotonic()
            if result[2] or remaining <= 0:
                return result
            epoch, cursor = result[0], result[1]  # own entries only: skip them and wait on
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
