"""The state of the routers' shared board (`router.route_board`): recent placements, numbered, and
each router's latest in-flight counts per replica.

Pure logic (no Ray): publishing appends a placement or replaces a router's counts; a follower
reads what came after its cursor, skipping its own, or waits for the next update by another
router. A recreated board has a new epoch, and a cursor from an old epoch reads from the start.
Counts wake no follower (every Ray call costs CPU the engines share; on this 2-core host waking on
them cost a tenth of a core with 4 gateways): followers read them when a placement or the long
poll's timeout wakes them. Counts that did not change only refresh when the board last heard from
their router; a router not heard from for `loads_ttl_s` has its counts replaced by none.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

MAX_ENTRIES = 4096  # placements the board keeps (a router behind by more misses the oldest)
LOADS_TTL_S = 5.0  # a router's counts are dropped this long after it was last heard from


@dataclass(frozen=True)
class RouteEntry:
    seq: int  # 1, 2, ... within one board's life (`RouteLog.epoch`)
    router_id: str
    replica_id: str
    block_hashes: bytes  # packed native uint64 (`pack_hashes`)
    published_at: float  # time.time() on the board when published


@dataclass(frozen=True)
class LoadEntry:
    """A router's requests in flight per replica when it published them (its whole count)."""

    seq: int  # from the same counter as the placements
    router_id: str
    counts: tuple[tuple[str, int], ...]  # (replica id, requests), sorted
    published_at: float  # time.time() on the board


@dataclass(frozen=True)
class BoardRead:
    """What a follower gets: the board's epoch, its new cursor, and the other routers' updates."""

    epoch: str
    cursor: int
    entries: list[RouteEntry]  # placements after the cursor, oldest first
    loads: list[LoadEntry]  # each other router's counts, if published after the cursor

    @property
    def is_empty(self) -> bool:
        return not self.entries and not self.loads


def pack_hashes(hashes: Sequence[int]) -> bytes:
    return array("Q", hashes).tobytes()


def unpack_hashes(data: bytes) -> list[int]:
    packed = array("Q")
    packed.frombytes(data)
    return packed.tolist()


class LoadsSender:
    """When a router sends its in-flight counts: with a batch of placements if they changed since
    last sent, or every `heartbeat_s` whatever they are (so that the board keeps the router)."""

    def __init__(self, heartbeat_s: float) -> None:
        self.heartbeat_s = heartbeat_s
        self._sent: dict[str, int] | None = None  # the counts last sent
        self._sent_at = float("-inf")

    def is_heartbeat_due(self, now: float) -> bool:
        return now - self._sent_at >= self.heartbeat_s

    def to_send(self, counts: dict[str, int], now: float) -> dict[str, int] | None:
        """`counts` if they changed since last sent or a heartbeat is due (then they count as sent),
        else None."""
        if counts == self._sent and not self.is_heartbeat_due(now):
            return None
        self._sent, self._sent_at = counts, now
        return counts

    def reset(self) -> None:
        """The board was recreated and knows nobody's counts: the next ones go out whatever they are."""
        self._sent = None


class RouteLog:
    """The last `max_entries` placements, numbered; followers read what came after their cursor."""

    def __init__(
        self,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
        loads_ttl_s: float = LOADS_TTL_S,
    ) -> None:
        self.epoch = uuid.uuid4().hex
        self._entries: deque[RouteEntry] = deque(maxlen=max_entries)
        self._seq = 0
        self._loads: dict[str, LoadEntry] = {}  # router id -> its latest counts
        self._heard_at: dict[str, float] = {}  # router id -> its last counts message (changed or not)
        self._loads_ttl_s = loads_ttl_s
        self._clock = clock
        self._changed = asyncio.Event()

    def publish(self, router_id: str, replica_id: str, block_hashes: bytes) -> int:
        self._seq += 1
        self._entries.append(RouteEntry(self._seq, router_id, replica_id, block_hashes, self._clock()))
        self._wake()
        return self._seq

    def publish_loads(self, router_id: str, counts: Mapping[str, int]) -> int:
        """`router_id`'s requests in flight per replica, replacing its previous counts (unchanged
        counts only mark it alive); returns the board's sequence number."""
        now = self._clock()
        self._heard_at[router_id] = now
        pairs = tuple(sorted((r, n) for r, n in counts.items() if n > 0))
        last = self._loads.get(router_id)
        if last is None or last.counts != pairs:
            self._set_loads(router_id, pairs, now)
        return self._seq

    def _set_loads(self, router_id: str, pairs: tuple[tuple[str, int], ...], now: float) -> None:
        self._seq += 1
        self._loads[router_id] = LoadEntry(self._seq, router_id, pairs, now)

    def _expire_loads(self) -> None:
        """Routers silent for `loads_ttl_s` (gone) count nothing from now on."""
        now = self._clock()
        for router_id, heard_at in list(self._heard_at.items()):
            if heard_at < now - self._loads_ttl_s:
                del self._heard_at[router_id]
                if self._loads[router_id].counts:
                    self._set_loads(router_id, (), now)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # waiters hold the old (set) event; later ones wait anew

    def since(self, epoch: str, cursor: int, router_id: str) -> BoardRead:
        """Placements and counts after `cursor` not published by `router_id`. A cursor from another
        epoch (the board was recreated) reads from the start."""
        self._expire_loads()
        if epoch != self.epoch:
            cursor = 0
        fresh = []
        for entry in reversed(self._entries):  # seqs grow (with gaps, where counts took one)
            if entry.seq <= cursor:
                break
            if entry.router_id != router_id:
                fresh.append(entry)
        fresh.reverse()
        loads = sorted(
            (e for e in self._loads.values() if e.seq > cursor and e.router_id != router_id),
            key=lambda e: e.seq,
        )
        return BoardRead(self.epoch, self._seq, fresh, loads)

    async def wait_since(self, epoch: str, cursor: int, router_id: str, timeout_s: float) -> BoardRead:
        """`since`, but waits up to `timeout_s` for an update by another router."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.since(epoch, cursor, router_id)
            remaining = deadline - time.monotonic()
            if not result.is_empty or remaining <= 0:
                return result
            epoch, cursor = result.epoch, result.cursor  # own updates only: skip them and wait on
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
