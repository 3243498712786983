"""One router's whole decision state, without Serve: the replicas' views, their loads, the requests
it routed, and the policy that ranks them.

`router.serve_adapter` drives it from Serve's hooks and `benchmarks/routing_replay.py` from a
simulation, so both run the same code. Time is passed in: `now` is monotonic seconds (report ages,
guesses), `wall_now` is `time.time()` (`router.replica_loads` compares it with the replicas'
report times).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.block_hash import root_hash
from protocol.report import ReplicaReport
from router.peer_loads import PeerLoads
from router.policy import (
    Candidate,
    PowerOfTwo,
    RoundRobin,
    RouteDecision,
    RouterConfig,
    rank_prefix,
    tie_key_of,
)
from router.prefix_index import PrefixIndex
from router.replica_loads import ReplicaLoads

MAX_TRACKED_REQUESTS = 65536  # routed requests remembered for in-flight counts (oldest dropped)


@dataclass(frozen=True)
class Routed:
    replica_id: str
    block_hashes: tuple[int, ...]
    routed_at: float  # wall clock, as `router.replica_loads` counts


class RouterCore:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.index = PrefixIndex(config.block_size, config.guess_ttl_s)
        self.loads = ReplicaLoads(config.load_source, config.stale_after_s)
        self.peer_loads = PeerLoads()  # other gateways' routers (through the route board)
        self._round_robin = RoundRobin()
        self._power_of_two = PowerOfTwo(config.seed)
        self._routed: OrderedDict[str, Routed] = OrderedDict()  # request id -> where it went

    # --- what the replicas say -------------------------------------------------------------------

    def apply_report(self, replica_id: str, report: ReplicaReport | None, now: float) -> None:
        self.index.apply_report(replica_id, report, now)

    def retain(self, replica_ids: Sequence[str]) -> None:
        """Forget replicas that are gone."""
        self.index.retain(replica_ids)
        self.loads.retain(replica_ids)

    def apply_shared_guess(
        self, replica_id: str, block_hashes: Sequence[int], age_s: float, now: float
    ) -> None:
        """Another router sent a prompt to `replica_id` `age_s` ago: the same guess it made."""
        if age_s < self.config.guess_ttl_s:
            self.index.note_routed(replica_id, block_hashes, now - age_s)

    def apply_peer_loads(self, router_id: str, counts: dict[str, int]) -> None:
        """Another router's requests in flight per replica, as it last published them."""
        self.peer_loads.update(router_id, counts)

    def forget_peer_loads(self) -> None:
        """The board is gone or was recreated: count this router's own requests and reports again."""
        self.peer_loads.clear()

    def own_loads(self) -> dict[str, int]:
        """This router's requests in flight per replica (what it publishes to the others)."""
        return self.loads.in_flight()

    # --- deciding ----------------------------------------------------------------------------------

    def candidate(
        self,
        replica_id: str,
        hashes: Sequence[int],
        num_tokens: int,
        queue_len: int,
        now: float,
        wall_now: float,
    ) -> Candidate:
        """One replica's cached prefix and load (requests: `router.replica_loads`); `queue_len` is
        Serve's cached queue length (0 if none)."""
        load = self.index.load(replica_id, now)
        is_fresh = load is not None and load.report_age_s <= self.config.stale_after_s
        reported, recorded_at = None, 0.0
        if load is not None and is_fresh:
            reported, recorded_at = load.num_running + load.num_waiting, load.recorded_at
        is_shared = self.config.share_loads and self.peer_loads.is_live
        peers = self.peer_loads.num_requests(replica_id) if is_shared else None
        num_requests = self.loads.num_requests(replica_id, reported, recorded_at, queue_len, wall_now, peers)
        num_evicted = 0
        if self.config.eviction_aware and load is not None:  # evicted since the report was taken
            num_evicted = int(self.index.evictions_per_s(replica_id) * max(0.0, wall_now - load.recorded_at))
        cached = self.index.matched_blocks(replica_id, hashes, num_tokens, now, num_evicted) if hashes else 0
        kv_usage = load.kv_usage if load is not None else 0.0
        held = self.index.num_held_blocks(replica_id) if is_fresh else 0
        return Candidate(
            replica_id,
            cached,
            num_requests,
            kv_usage,
            is_fresh,
            held,
            num_tokens,
            load.step_s if load is not None else None,
            load.prefill_tokens_per_s if load is not None else None,
        )

    def rank(self, candidates: Sequence[Candidate], hashes: Sequence[int], salt: str | None) -> RouteDecision:
        """The configured policy's ranking, most preferred first."""
        if self.config.policy == "round_robin":
            return self._round_robin.rank([c.replica_id for c in candidates])
        if self.config.policy == "power_of_two":
            return self._power_of_two.rank(candidates)
        tie_key = tie_key_of(candidates, hashes, root_hash(salt), self.config.tie_break)
        return rank_prefix(candidates, self.config, tie_key)

    # --- what happened to a request ----------------------------------------------------------------

    def routed(
        self, request_id: str, replica_id: str, hashes: Sequence[int], now: float, wall_now: float
    ) -> None:
        """Count the request against its first choice now, so a burst routed before any replica
        answers still spreads; `forget` undoes it if the request is never sent."""
        self.forget(request_id)  # a retry of the same request
        self._routed[request_id] = Routed(replica_id, tuple(hashes), wall_now)
        self.loads.routed(replica_id, wall_now)
        self.index.note_routed(replica_id, hashes, now)
        while len(self._routed) > MAX_TRACKED_REQUESTS:
            self.forget(next(iter(self._routed)))

    def moved(self, request_id: str, replica_id: str, now: float) -> tuple[int, ...] | None:
        """Serve sent the request to `replica_id` instead (its first choice was full): the guess moves
        there. Returns the moved prompt's hashes (None: nothing moved)."""
        routed = self._routed.get(request_id)
        if routed is None or routed.replica_id == replica_id:
            return None
        self.loads.moved(routed.replica_id, replica_id)
        self._routed[request_id] = Routed(replica_id, routed.block_hashes, routed.routed_at)
        self.index.drop_guesses(routed.replica_id, routed.block_hashes)
        self.index.note_routed(replica_id, routed.block_hashes, now)
        return routed.block_hashes

    def completed(self, request_id: str, replica_id: str, wall_now: float) -> None:
        routed = self._routed.get(request_id)
        if routed is not None and routed.replica_id == replica_id:
            del self._routed[request_id]
            self.loads.completed(routed.replica_id, routed.routed_at, wall_now)
            self.index.note_freed(replica_id, routed.block_hashes)

    def routed_to(self, request_id: str) -> str | None:
        routed = self._routed.get(request_id)
        return None if routed is None else routed.replica_id

    def forget(self, request_id: str) -> None:
        """Drop a routed request that did not run where it was routed (retried, cancelled, or the
        oldest of too many tracked)."""
        routed = self._routed.pop(request_id, None)
        if routed is not None:
            self.loads.dropped(routed.replica_id)
