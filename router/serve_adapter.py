"""The one file touching Serve's alpha `RequestRouter` API: prefix-aware routing for a handle.

The decisions are `router.router_core.RouterCore`'s (pure; the replay benchmark drives the same
class): each candidate's latest report (`protocol.report.ReplicaReport`, in Serve's routing stats)
is applied whenever Serve pushes replica updates; a request's prompt and salt (its one argument, a
`protocol.messages.GenerateRequest`) are hashed like the engine does, replicas are scored by
`router.policy`, and the ranking is returned one replica per rank, so Serve takes the best one that
still has room. Not FIFO: Serve's default matching hands the chosen replica to this exact request,
which is what prefix affinity needs. With several gateways, the route board carries every router's
placements and in-flight counts to the others (`router.route_board`).

Serve asks again while no ranked replica has room; each request is marked for Serve's exponential
backoff between those asks (a custom router otherwise gets them back to back, a core spinning), and
one still unplaced after `max_routing_wait_s` fails with `RoutingTimeout` (the API answers 503).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from observability.recorder import Metrics
from protocol.messages import GenerateRequest
from protocol.report import report_in
from router.hashing import hash_prompt_blocks
from router.policy import Candidate, RouteDecision, RouterConfig, decision_reason
from router.route_board import BoardClient
from router.router_core import RouterCore


class RoutingTimeout(RuntimeError):
    """No replica had room for the request within `RouterConfig.max_routing_wait_s`."""


@dataclass(frozen=True)
class DecisionRecord:
    """One routing decision, for metrics: where it went and how many prompt tokens should hit."""

    request_id: str
    replica_id: str
    reason: str  # policy.decision_reason: prefix, load, fallback, round_robin, power_of_two
    num_prompt_tokens: int
    expected_hit_tokens: int


def make_request_router_config(
    config: RouterConfig,
    stats_period_s: float,
    router_class: type[PrefixAwareRequestRouter] | None = None,
) -> RequestRouterConfig:
    """Serve's router config for a deployment routed by `router_class` (default
    `PrefixAwareRequestRouter`; a subclass gives the router its metrics, `make_metrics`).

    Reports arrive about every `stats_period_s` (Serve polls `record_routing_stats`); a replica is
    stale after `config.stale_after_s`, so the period must leave room for a late poll or two.
    """
    if stats_period_s * 2 > config.stale_after_s:
        raise ValueError(
            f"router stale_after_s ({config.stale_after_s}) must be at least twice the routing stats "
            f"period ({stats_period_s}), or every replica would look stale between reports"
        )
    options: dict[str, Any] = {  # Ray annotates every keyword of this constructor as a dict
        "request_router_class": router_class or PrefixAwareRequestRouter,
        "request_router_kwargs": config.to_kwargs(),
        "request_routing_stats_period_s": stats_period_s,
        "request_routing_stats_timeout_s": max(stats_period_s * 3, 1.0),
    }
    return RequestRouterConfig(**options)


def _prompt_of(pending_request: PendingRequest | None) -> tuple[Sequence[int], str | None]:
    """The prompt and tenant salt of the `GenerateRequest` a call carries as its one argument (the
    attention replica's `generate`), or ([], None) for a call of another method."""
    args = pending_request.args if pending_request is not None else ()
    if not args or not isinstance(args[0], GenerateRequest):
        return [], None
    return args[0].prompt_token_ids, args[0].salt


class PrefixAwareRequestRouter(RequestRouter):
    """Serve calls `initialize_state(**RouterConfig.to_kwargs())` once, then routes with it.
    Records no metrics; the composition root's subclass returns its backend from `make_metrics`
    (built in the router's own process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup(RouterConfig())

    def initialize_state(self, **kwargs: Any) -> None:
        self._setup(RouterConfig.from_kwargs(kwargs))

    def _setup(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = self.make_metrics()
        self.core = RouterCore(config)
        self.index = self.core.index
        self._first_asked: dict[str, float] = {}  # internal request id -> monotonic time, until placed
        self.decisions: deque[DecisionRecord] = deque(maxlen=1024)
        self.num_decisions: Counter[str] = Counter()  # reason -> decisions
        self.num_expected_hit_tokens = 0
        self.num_prompt_tokens = 0
        # guesses shared with the other gateways' routers (router/route_board.py)
        self._board = (
            BoardClient(config.route_board) if config.route_board and config.policy == "prefix" else None
        )
        self._board_task: asyncio.Task[None] | None = None

    def make_metrics(self) -> Metrics | None:
        """Where routing decisions are recorded (none here)."""
        return None

    # --- Serve hooks -----------------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._apply_reports(replicas)
        self.core.retain([r.replica_id.unique_id for r in replicas])

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.core.retain([r.unique_id for r in self.curr_replicas if r != replica_id])

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
            if self._gave_up(pending_request):  # Serve checks the future once it has candidates
                return [list(candidate_replicas)]
        self._apply_reports(candidate_replicas)  # no-op unless a report is new
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        token_ids, salt = _prompt_of(pending_request)
        hashes: list[int] = []
        if self.config.policy == "prefix":
            if token_ids:
                hashes = await hash_prompt_blocks(
                    token_ids,
                    self.config.block_size,
                    salt,
                    self.config.max_hashed_blocks,
                    self.config.hash_chunk_blocks,
                )
            self._follow_board()
        candidates = await self._candidates(candidate_replicas, hashes, len(token_ids))
        decision = self.core.rank(candidates, hashes, salt)
        if pending_request is not None:
            self._note_routed(pending_request, decision.ranked[0], hashes)
            self._record(pending_request, decision, len(token_ids))
        return [[by_id[replica_id]] for replica_id in decision.ranked if replica_id in by_id]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        """Serve took another replica than our first choice (it was full): move the guess there."""
        request_id = pending_request.metadata.internal_request_id
        actual = replica_id.unique_id
        moved = self.core.moved(request_id, actual, time.monotonic())
        if moved is not None and self._board is not None:
            self._board.publish(actual, moved)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.core.completed(internal_request_id, replica_id.unique_id, time.time())

    # --- internals -------------------------------------------------------------------------------

    def _gave_up(self, pending_request: PendingRequest) -> bool:
        """Fails the request's future with RoutingTimeout once it has been asked about for longer
        than `max_routing_wait_s`; Serve then stops routing it (it checks the future after every ask)."""
        request_id = pending_request.metadata.internal_request_id
        future = pending_request.future
        now = time.monotonic()
        first = self._first_asked.get(request_id)
        if first is None:
            self._first_asked[request_id] = now
            future.add_done_callback(lambda _: self._first_asked.pop(request_id, None))
        elif now - first > self.config.max_routing_wait_s and not future.done():
            future.set_exception(
                RoutingTimeout(
                    f"no attention replica had room for the request within {self.config.max_routing_wait_s} s"
                )
            )
            return True
        return future.done()

    def _apply_reports(self, replicas: Sequence[RunningReplica]) -> None:
        now = time.monotonic()
        for replica in replicas:
            self.core.apply_report(replica.replica_id.unique_id, report_in(replica.routing_stats), now)

    async def _candidates(
        self, replicas: Sequence[RunningReplica], hashes: Sequence[int], num_tokens: int
    ) -> list[Candidate]:
        """Each replica's cached prefix and load (`RouterCore.candidate`). A long prompt yields to
        the loop between replicas (matching costs up to ~1 µs per block per replica)."""
        is_long = len(hashes) > self.config.hash_chunk_blocks
        now, wall_now = time.monotonic(), time.time()
        candidates: list[Candidate] = []
        for replica in replicas:
            if is_long and candidates:
                await asyncio.sleep(0)
            queue_len = self.replica_queue_len_cache.get(replica.replica_id) or 0
            candidates.append(
                self.core.candidate(
                    replica.replica_id.unique_id, hashes, num_tokens, queue_len, now, wall_now
                )
            )
        return candidates

    def _note_routed(self, pending_request: PendingRequest, replica_id: str, hashes: Sequence[int]) -> None:
        """Count the request against its first choice now (`RouterCore.routed`); undone if the
        request is cancelled before it is sent."""
        request_id = pending_request.metadata.internal_request_id
        self.core.routed(request_id, replica_id, hashes, time.monotonic(), time.time())
        if self._board is not None:
            self._board.publish(replica_id, hashes)

        def on_done(future: asyncio.Future[Any]) -> None:
            if future.cancelled() and self.core.routed_to(request_id) == replica_id:
                self.core.forget(request_id)

        pending_request.future.add_done_callback(on_done)

    def _follow_board(self) -> None:
        """Starts the board client's task on the router's loop at the first decision (never waits)."""
        if self._board is not None and self._board_task is None:
            own_loads = self.core.own_loads if self.config.share_loads else None
            self._board_task = asyncio.get_running_loop().create_task(
                self._board.run(self._apply_shared_guess, self._apply_peer_loads, own_loads)
            )

    def _apply_shared_guess(self, replica_id: str, block_hashes: list[int], age_s: float) -> None:
        """Another router sent a prompt to `replica_id` `age_s` ago: the same guess it made."""
        self.core.apply_shared_guess(replica_id, block_hashes, age_s, time.monotonic())

    def _apply_peer_loads(self, router_id: str | None, counts: dict[str, int]) -> None:
        """Another router's requests in flight per replica (`router.peer_loads`); None: the board
        failed or was recreated, so nobody's counts are current."""
        if router_id is None:
            self.core.forget_peer_loads()
        else:
            self.core.apply_peer_loads(router_id, counts)

    def _record(
        self, pending_request: PendingRequest, decision: RouteDecision, num_prompt_tokens: int
    ) -> None:
        """The metrics hook: every decision with its expected prefix-cache hit."""
        expected_hit_tokens = decision.expected_hit_blocks * self.config.block_size
        replica_id, reason = decision.ranked[0], decision_reason(decision)
        record = DecisionRecord(
            pending_request.metadata.internal_request_id,
            replica_id,
            reason,
            num_prompt_tokens,
            expected_hit_tokens,
        )
        self.decisions.append(record)
        self.num_decisions[reason] += 1
        self.num_expected_hit_tokens += expected_hit_tokens
        self.num_prompt_tokens += num_prompt_tokens
        if self.metrics is not None:
            self.metrics.routed(
                replica=replica_id,
                reason=reason,
                num_prompt_tokens=num_prompt_tokens,
                num_expected_hit_tokens=expected_hit_tokens,
            )

    def view_summary(self) -> dict[str, Mapping[str, Any]]:
        """Per replica: epoch, log cursor, held GA/SWA blocks, report age (for debugging and tests)."""
        now = time.monotonic()
        summary: dict[str, Mapping[str, Any]] = {}
        for replica_id in self.index.replica_ids:
            state = self.index.view_state(replica_id)
            load = self.index.load(replica_id, now)
            summary[replica_id] = {
                "epoch": state.epoch,
                "cursor": state.cursor,
                "num_full_blocks": len(state.full),
                "num_swa_blocks": len(state.swa),
                "report_age_s": None if load is None else load.report_age_s,
            }
        return summary
