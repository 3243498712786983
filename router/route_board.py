"""Routing guesses shared between gateway routers: a small Ray actor holding recent placements.

A router guesses that a replica will hold a prompt's blocks as soon as it sends the prompt there,
but the replica's own report of those blocks reaches every router only after the next stats poll
(about a second). With several gateway replicas a session's next turn often reaches a router that
has not seen the first turn yet, and it goes elsewhere (sglang-router and Dynamo have this problem;
PEERS.md). So each router sends its placements to one `RouteBoard` actor (batched every BATCH_S)
and follows it with a long poll: other routers' placements arrive within tens of milliseconds and
become guesses there too.
`router.route_log.RouteLog` is the board's state; `RouteBoard` the Ray actor around it;
`BoardClient` what a router holds. Only guesses travel this way: what a replica holds is still
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

from router.route_log import RouteEntry, RouteLog, pack_hashes, unpack_hashes

logger = logging.getLogger(__name__)

LONG_POLL_S = 5.0  # a follower's wait for new placements before asking again
RETRY_S = 1.0  # after the board fails: wait, then get or create it again
BATCH_S = 0.02  # a router sends its placements at most this often (one call for all of them)
# after a read that brought placements, a follower waits this long before the next, so a burst of
# placements by other routers costs one reply, not one each
COALESCE_S = 0.05


class RouteBoard:
    """The Ray actor (async: waiting followers cost no thread)."""

    def __init__(self) -> None:
        self.log = RouteLog()

    async def publish(self, router_id: str, placements: list[tuple[str, bytes]]) -> None:
        for replica_id, block_hashes in placements:
            self.log.publish(router_id, replica_id, block_hashes)

    async def wait_since(
        self, epoch: str, cursor: int, router_id: str, timeout_s: float
    ) -> tuple[str, int, list[RouteEntry]]:
        return await self.log.wait_since(epoch, cursor, router_id, timeout_s)


def get_or_create_board(name: str) -> Any:
    """The named board in the caller's namespace; created (owned by the caller) if there is none.
    Non-detached: it ends with the process that created it, and a follower then creates another."""
    return ray.remote(RouteBoard).options(name=name, get_if_exists=True, num_cpus=0, max_restarts=0).remote()


ApplyGuess = Callable[[str, list[int], float], None]  # (replica id, block hashes, age in seconds)


class BoardClient:
    """A router's side. `publish` only queues; `run` (one task on the router's event loop) sends the
    queue every BATCH_S and long-polls the board, applying other routers' placements. Best effort:
    placements queued while the board is down are dropped, and routing never waits for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.router_id = uuid.uuid4().hex
        self._board: Any = None
        self._epoch = ""
        self._cursor = 0
        self._queue: list[tuple[str, bytes]] = []
        self._failed_logged = False

    def publish(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        if block_hashes:
            self._queue.append((replica_id, pack_hashes(block_hashes)))

    async def run(self, apply: ApplyGuess) -> None:
        """Sends and follows until cancelled or until this process leaves Ray; after a failure waits
        RETRY_S and gets (or creates) the board again."""
        await asyncio.gather(self._send_loop(), self._follow_loop(apply))

    async def _send_loop(self) -> None:
        while ray.is_initialized():
            await asyncio.sleep(BATCH_S)
            if not self._queue:
                continue
            batch, self._queue = self._queue, []
            try:
                self._handle().publish.remote(self.router_id, batch)  # not awaited: nothing to wait for
            except Exception as exc:
                self._board_failed(exc)

    async def _follow_loop(self, apply: ApplyGuess) -> None:
        while ray.is_initialized():
            try:
                ref = self._handle().wait_since.remote(self._epoch, self._cursor, self.router_id, LONG_POLL_S)
                epoch, cursor, entries = await asyncio.wait_for(ref, LONG_POLL_S + 30.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._board_failed(exc)
                await asyncio.sleep(RETRY_S)
                continue
            now = time.time()
            self._epoch, self._cursor = epoch, cursor
            for e in entries:
                apply(e.replica_id, unpack_hashes(e.block_hashes), max(0.0, now - e.published_at))
            if entries:
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
