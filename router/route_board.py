"""Routing guesses and loads shared between gateway routers: a small Ray actor holding recent
placements and each router's requests in flight.

A router guesses that a replica will hold a prompt's blocks as soon as it sends the prompt there,
but the replica's own report of those blocks reaches every router only after the next stats poll
(about a second). With several gateway replicas a session's next turn often reaches a router that
has not seen the first turn yet, and it goes elsewhere (sglang-router and Dynamo have this problem;
PEERS.md). So each router sends its placements to one `RouteBoard` actor (batched every BATCH_S)
and follows it with a long poll: other routers' placements arrive within tens of milliseconds and
become guesses there too.
`router.route_log.RouteLog` is the board's state; `RouteBoard` the Ray actor around it;
`BoardClient` what a router holds. Each router also publishes its in-flight count per replica
(with its placements when they changed, and every LOAD_HEARTBEAT_S), so every router counts the
others' requests (`router.peer_loads`) instead of herding on a second-old report. What a replica holds is still
decided by its own reports.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray

from router.route_log import BoardRead, LoadsSender, RouteLog, pack_hashes, unpack_hashes

logger = logging.getLogger(__name__)

LONG_POLL_S = 5.0  # a follower's wait for new placements before asking again
RETRY_S = 1.0  # after the board fails: wait, then get or create it again
BATCH_S = 0.02  # a router sends its placements at most this often (one call for all of them)
# after a read that brought placements, a follower waits this long before the next, so a burst of
# placements by other routers costs one reply, not one each
COALESCE_S = 0.05
# a router republishes unchanged counts this often, so that the board keeps it (route_log.LOADS_TTL_S)
LOAD_HEARTBEAT_S = 1.0


class RouteBoard:
    """The Ray actor (async: waiting followers cost no thread)."""

    def __init__(self) -> None:
        self.log = RouteLog()

    async def publish(
        self, router_id: str, placements: list[tuple[str, bytes]], loads: dict[str, int] | None = None
    ) -> None:
        for replica_id, block_hashes in placements:
            self.log.publish(router_id, replica_id, block_hashes)
        if loads is not None:
            self.log.publish_loads(router_id, loads)

    async def wait_since(self, epoch: str, cursor: int, router_id: str, timeout_s: float) -> BoardRead:
        return await self.log.wait_since(epoch, cursor, router_id, timeout_s)


def get_or_create_board(name: str) -> Any:
    """The named board in the caller's namespace; created (owned by the caller) if there is none.
    Non-detached: it ends with the process that created it, and a follower then creates another."""
    return ray.remote(RouteBoard).options(name=name, get_if_exists=True, num_cpus=0, max_restarts=0).remote()


ApplyGuess = Callable[[str, list[int], float], None]  # (replica id, block hashes, age in seconds)
# (router id, its requests in flight per replica); (None, {}) first when the others' counts are void
ApplyLoads = Callable[[str | None, dict[str, int]], None]
OwnLoads = Callable[[], dict[str, int]]  # this router's requests in flight per replica


class BoardClient:
    """A router's side. `publish` only queues; `run` (one task on the router's event loop) sends the
    queue with the router's in-flight counts (when changed) every BATCH_S and long-polls the board,
    applying other routers' placements and counts. Best effort: placements queued while the board
    is down are dropped, and routing never waits for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.router_id = uuid.uuid4().hex
        self._board: Any = None
        self._epoch = ""
        self._cursor = 0
        self._queue: list[tuple[str, bytes]] = []
        self.loads_sender = LoadsSender(LOAD_HEARTBEAT_S)
        self._failed_logged = False

    def publish(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        if block_hashes:
            self._queue.append((replica_id, pack_hashes(block_hashes)))

    async def run(
        self, apply: ApplyGuess, apply_loads: ApplyLoads | None = None, own_loads: OwnLoads | None = None
    ) -> None:
        """Sends and follows until cancelled or until this process leaves Ray; after a failure waits
        RETRY_S and gets (or creates) the board again. Without `own_loads` no counts are shared."""
        await asyncio.gather(self._send_loop(own_loads), self._follow_loop(apply, apply_loads))

    async def _send_loop(self, own_loads: OwnLoads | None) -> None:
        while ray.is_initialized():
            await asyncio.sleep(BATCH_S)
            now = time.monotonic()
            is_heartbeat_due = own_loads is not None and self.loads_sender.is_heartbeat_due(now)
            if not self._queue and not is_heartbeat_due:
                continue  # counts ride with placements (one call for both), or on the heartbeat
            loads = None if own_loads is None else self.loads_sender.to_send(own_loads(), now)
            batch, self._queue = self._queue, []
            try:  # not awaited: nothing to wait for
                self._handle().publish.remote(self.router_id, batch, loads)
            except Exception as exc:
                self._board_failed(exc)

    async def _follow_loop(self, apply: ApplyGuess, apply_loads: ApplyLoads | None) -> None:
        while ray.is_initialized():
            try:
                ref = self._handle().wait_since.remote(self._epoch, self._cursor, self.router_id, LONG_POLL_S)
                read: BoardRead = await asyncio.wait_for(ref, LONG_POLL_S + 30.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._board_failed(exc)
                if apply_loads is not None:
                    apply_loads(None, {})  # nobody's counts are current now
                await asyncio.sleep(RETRY_S)
                continue
            now = time.time()
            if read.epoch != self._epoch:
                self.loads_sender.reset()  # a new board knows nobody's counts: send ours again
                if apply_loads is not None:
                    apply_loads(None, {})
            self._epoch, self._cursor = read.epoch, read.cursor
            for e in read.entries:
                apply(e.replica_id, unpack_hashes(e.block_hashes), max(0.0, now - e.published_at))
            if apply_loads is not None:
                for load in read.loads:
                    apply_loads(load.router_id, dict(load.counts))
            if not read.is_empty:
                await asyncio.sleep(COALESCE_S)

    def _handle(self) -> Any:
        if not ray.is_initialized():
            # never let a Ray call connect this process again (Ray's auto-init) after it left Ray,
            # e.g. a driver's router whose loop outlives `ray.shutdown()`
            raise RuntimeError("this process left Ray")
        if self._board is None:
            self._board = get_or_create_board(self.name)
        return self._board

    def _board_failed(self, exc: Exception) -> None:
        self._board = None  # the next use gets or creates it again
        if not self._failed_logged:
            logger.warning("route board %s unavailable (%s); routing on local guesses", self.name, exc)
            self._failed_logged = True
