"""The routing replay's simulation: sessions arrive, N routers place their turns on simulated replicas.

Each router is a `router.router_core.RouterCore` (what `router/serve_adapter.py` runs inside Serve),
driven the way the adapter drives it: before a decision it applies each replica's latest report it
can see (`report_delay_s` old or more), scores the candidates, notes the placement, and learns of
completions of the requests it routed. With several routers their placements (and, when shared,
their in-flight counts) travel through the project's `RouteLog` every `board_period_s`, sent and
read as `router.route_board.BoardClient` does.
Replicas are `benchmarks.replay_replica.SimReplica`s. Everything is seeded: a run is a pure
function of its workload and `SimConfig`.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.replay_replica import ReplicaParams, SimReplica, SimRequest
from protocol.report import ReplicaReport
from router.policy import RouterConfig
from router.route_log import LoadsSender, RouteLog, pack_hashes, unpack_hashes
from router.router_core import RouterCore


@dataclass(frozen=True)
class Turn:
    hashes: tuple[int, ...]  # the prompt's full blocks, chained as the engine hashes them
    num_prompt_tokens: int
    num_output_tokens: int
    think_s: float  # the user's pause after the previous turn's answer (0 for the first turn)


@dataclass(frozen=True)
class Workload:
    session_starts_s: tuple[float, ...]
    sessions: tuple[tuple[Turn, ...], ...]

    @property
    def num_requests(self) -> int:
        return sum(len(s) for s in self.sessions)


@dataclass(frozen=True)
class SimConfig:
    router: RouterConfig
    replica: ReplicaParams
    num_replicas: int = 4
    num_routers: int = 1
    report_delay_s: float = 0.0  # a report reaches the routers this long after the replica takes it
    report_period_s: float = 0.1  # replicas take a report this often
    board_period_s: float = 0.05  # the route board's batching and long-poll latency
    load_heartbeat_s: float = 1.0  # route_board.LOAD_HEARTBEAT_S
    long_poll_s: float = 5.0  # route_board.LONG_POLL_S: a follower nobody wakes reads this often
    seed: int = 0  # which router each request reaches


@dataclass
class Outcome:
    """Per request, in arrival order, plus the load samples and estimate errors of the run."""

    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    queue_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    arrival_hashes: list[tuple[int, ...]] = field(default_factory=list)
    num_tokens_in_order: list[int] = field(default_factory=list)
    picked_not_least: int = 0  # picks of a replica with more requests (truth) than the least loaded
    load_ratios: list[float] = field(default_factory=list)  # max / mean replica requests, sampled
    estimate_errors: list[list[int]] = field(default_factory=list)  # per router: estimate - truth


class _Router:
    """One gateway's router: a RouterCore, its outbox to the board and its cursor on it."""

    def __init__(self, index: int, config: RouterConfig, heartbeat_s: float) -> None:
        self.router_id = f"router{index}"
        self.core = RouterCore(config)
        self.outbox: list[tuple[str, tuple[int, ...]]] = []
        self.epoch, self.cursor = "", 0
        self.loads_sender = LoadsSender(heartbeat_s)
        self.read_at = 0.0  # its last read of the board


class Simulation:
    def __init__(self, workload: Workload, config: SimConfig) -> None:
        self.workload = workload
        self.config = config
        self.replicas = [SimReplica(f"replica{i}", config.replica) for i in range(config.num_replicas)]
        self.routers = [_Router(i, config.router, config.load_heartbeat_s) for i in range(config.num_routers)]
        self.board = RouteLog(clock=lambda: self.now)
        self.now = 0.0
        self._events: list[tuple[float, int, str, int, int]] = []  # (time, order, kind, a, b)
        self._order = 0
        self._reports: list[deque[tuple[float, ReplicaReport]]] = [deque() for _ in self.replicas]
        self._random = random.Random(config.seed)
        self._requests: dict[str, tuple[SimRequest, int, int]] = {}  # id -> (request, session, turn)
        self.outcome = Outcome(estimate_errors=[[] for _ in self.routers])

    def run(self) -> Outcome:
        for session, start in enumerate(self.workload.session_starts_s):
            self._push(start, "arrive", session, 0)
        self._push(0.0, "report", 0, 0)
        if len(self.routers) > 1 and self.config.router.policy == "prefix":  # as the adapter has it
            self._push(self.config.board_period_s, "board", 0, 0)
        num_left = self.workload.num_requests
        while num_left:
            time, _, kind, a, b = heapq.heappop(self._events)
            self.now = time
            if kind == "arrive":
                self._arrive(a, b)
            elif kind == "step":
                num_left -= self._step(a, time)
            elif kind == "report":
                self._take_reports()
                self._push(time + self.config.report_period_s, "report", 0, 0)
            else:
                self._follow_board()
                self._push(time + self.config.board_period_s, "board", 0, 0)
        return self.outcome

    def _push(self, time: float, kind: str, a: int, b: int) -> None:
        self._order += 1
        heapq.heappush(self._events, (time, self._order, kind, a, b))

    def _arrive(self, session: int, turn_index: int) -> None:
        turn = self.workload.sessions[session][turn_index]
        router_index = self._random.randrange(len(self.routers))
        router = self.routers[router_index]
        request_id = f"s{session}t{turn_index}"
        replica_index = self._route(router_index, request_id, turn)
        request = SimRequest(
            request_id,
            router_index,
            turn.hashes,
            turn.num_prompt_tokens,
            turn.num_output_tokens,
            arrived_at=self.now,
        )
        self._requests[request_id] = (request, session, turn_index)
        self.outcome.arrival_hashes.append(turn.hashes)
        self.outcome.num_tokens_in_order.append(turn.num_prompt_tokens)
        replica = self.replicas[replica_index]
        was_idle = replica.step_ends_at is None
        replica.submit(request, self.now)
        if was_idle and replica.step_ends_at is not None:
            self._push(replica.step_ends_at, "step", replica_index, 0)
        router.outbox.append((replica.replica_id, turn.hashes))

    def _route(self, router_index: int, request_id: str, turn: Turn) -> int:
        core = self.routers[router_index].core
        visible_at = self.now - self.config.report_delay_s
        for replica, reports in zip(self.replicas, self._reports, strict=True):
            taken = [t for t, _ in reports]
            position = bisect.bisect_right(taken, visible_at)
            core.apply_report(replica.replica_id, reports[position - 1][1] if position else None, self.now)
        hashes = turn.hashes if core.config.policy == "prefix" else ()
        candidates = [
            core.candidate(r.replica_id, hashes, turn.num_prompt_tokens, 0, self.now, self.now)
            for r in self.replicas
        ]
        decision = core.rank(candidates, hashes, None)
        chosen = decision.ranked[0]
        core.routed(request_id, chosen, hashes, self.now, self.now)
        truth = [r.num_requests for r in self.replicas]
        errors = self.outcome.estimate_errors[router_index]
        errors.extend(c.num_requests - t for c, t in zip(candidates, truth, strict=True))
        index = int(chosen.removeprefix("replica"))
        self.outcome.picked_not_least += truth[index] > min(truth)
        return index

    def _step(self, replica_index: int, time: float) -> int:
        replica = self.replicas[replica_index]
        if replica.step_ends_at != time:
            return 0  # a stale event (the replica went idle and started again since)
        done = replica.finish_step(time)
        if replica.step_ends_at is not None:
            self._push(replica.step_ends_at, "step", replica_index, 0)
        for request in done:
            _, session, turn_index = self._requests.pop(request.request_id)
            core = self.routers[request.router_index].core
            core.completed(request.request_id, replica.replica_id, time)
            assert request.admitted_at is not None and request.first_token_at is not None
            self.outcome.prompt_tokens.append(request.num_prompt_tokens)
            self.outcome.cached_tokens.append(request.num_cached_tokens)
            self.outcome.queue_s.append(request.admitted_at - request.arrived_at)
            self.outcome.ttft_s.append(request.first_token_at - request.arrived_at)
            turns = self.workload.sessions[session]
            if turn_index + 1 < len(turns):
                self._push(time + turns[turn_index + 1].think_s, "arrive", session, turn_index + 1)
        return len(done)

    def _take_reports(self) -> None:
        keep_after = self.now - self.config.report_delay_s - 2 * self.config.report_period_s
        for replica, reports in zip(self.replicas, self._reports, strict=True):
            reports.append((self.now, replica.report()))
            while len(reports) > 1 and reports[1][0] <= keep_after:
                reports.popleft()
        loads = [r.num_requests for r in self.replicas]
        mean = sum(loads) / len(loads)
        if mean >= 1:
            self.outcome.load_ratios.append(max(loads) / mean)

    def _follow_board(self) -> None:
        """As `router.route_board.BoardClient` does: every router sends its queued placements with
        its in-flight counts (if they changed, or on the heartbeat), then each router that another's
        placement wakes, or whose long poll times out, reads the others' updates."""
        for router in self.routers:
            is_heartbeat_due = router.loads_sender.is_heartbeat_due(self.now)
            if not router.outbox and not (router.core.config.share_loads and is_heartbeat_due):
                continue
            for replica_id, hashes in router.outbox:
                if hashes:
                    self.board.publish(router.router_id, replica_id, pack_hashes(hashes))
            router.outbox = []
            if router.core.config.share_loads:
                counts = router.loads_sender.to_send(router.core.own_loads(), self.now)
                if counts is not None:
                    self.board.publish_loads(router.router_id, counts)
        for router in self.routers:
            read = self.board.since(router.epoch, router.cursor, router.router_id)
            if not read.entries and self.now - router.read_at < self.config.long_poll_s:
                continue  # counts alone wake nobody
            router.read_at = self.now
            router.epoch, router.cursor = read.epoch, read.cursor
            for entry in read.entries:
                age_s = max(0.0, self.now - entry.published_at)
                shared = unpack_hashes(entry.block_hashes)
                router.core.apply_shared_guess(entry.replica_id, shared, age_s, self.now)
            for load in read.loads:
                router.core.apply_peer_loads(load.router_id, dict(load.counts))


def ceiling_hit_rate(
    arrival_hashes: Sequence[tuple[int, ...]], num_tokens: Sequence[int], block_size: int
) -> float:
    """One cache that never evicts, prompts in arrival order (the engine's rule: one token left)."""
    seen: set[int] = set()
    cached = 0
    for hashes, n in zip(arrival_hashes, num_tokens, strict=True):
        max_blocks = min(len(hashes), (n - 1) // block_size)
        k = 0
        while k < max_blocks and hashes[k] in seen:
            k += 1
        cached += k * block_size
        seen.update(hashes)
    return cached / sum(num_tokens)
