"""Pure placement policies: prefix-aware scoring, its least-loaded fallback, and two baselines.

score = prefix_weight * cached_prefix_blocks - load_weight * num_requests - kv_weight * kv_usage
(blocks, not tokens: the spec's unit). A replica whose report is missing or older than
`stale_after_s` adds no prefix or KV term; when no candidate is fresh the ranking is plain least
loaded. Equal scores go first to the replica holding the fewest cached blocks (a prompt nobody
caches lands where it evicts the least and spreads distinct prefixes, so one replica does not end
up the home of most sessions), then by a rendezvous hash of (the prompt's first block, replica id):
deterministic, since every gateway's view converges to the same block sets.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

PolicyName = Literal["prefix", "round_robin", "power_of_two"]
# "handle": requests go through the router's handle, which sees each one complete (in-flight counts);
# "reports": requests are only chosen here and sent by someone else (HAProxy, direct streaming), so
# a replica's load is its last report plus what was routed to it since that report arrived
LoadSource = Literal["handle", "reports"]
RouteMode = Literal["prefix", "least_loaded", "round_robin", "power_of_two"]


@dataclass(frozen=True)
class RouterConfig:
    """Everything a router needs; the composition root fills it from `spec.router` and the engine."""

    policy: PolicyName = "prefix"
    block_size: int = 16  # must equal the engine's KV block size (the prefix-hash block)
    prefix_weight: float = 1.0  # score per cached prefix block
    load_weight: float = 4.0  # penalty per running + waiting + in-flight request
    kv_weight: float = 8.0  # penalty per unit of KV usage (0..1)
    stale_after_s: float = 10.0  # reports older than this carry no prefix or KV information
    guess_ttl_s: float = 10.0  # a just-routed prompt counts as cached this long unless confirmed
    max_hashed_blocks: int = 8192  # longest prefix considered (hashing cost is per block)
    hash_chunk_blocks: int = 128  # blocks hashed between event-loop yields
    seed: int = 0  # power-of-two sampling
    # a request no replica takes within this long (every replica full) fails with RoutingTimeout
    max_routing_wait_s: float = 30.0
    load_source: LoadSource = "handle"
    # name of the `router.route_board.RouteBoard` actor through which the routers of several gateway
    # replicas share their guesses; "" keeps guesses local (one gateway)
    route_board: str = ""

    def __post_init__(self) -> None:
        if self.load_source not in ("handle", "reports"):
            raise ValueError(f"RouterConfig.load_source must be handle or reports, got {self.load_source!r}")
        if self.policy not in ("prefix", "round_robin", "power_of_two"):
            raise ValueError(
                f"RouterConfig.policy must be prefix, round_robin or power_of_two, got {self.policy!r}"
            )
        for name in ("block_size", "max_hashed_blocks", "hash_chunk_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_routing_wait_s <= 0:
            raise ValueError(f"RouterConfig.max_routing_wait_s must be > 0, got {self.max_routing_wait_s}")
        for name in ("prefix_weight", "load_weight", "kv_weight", "guess_ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"RouterConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.stale_after_s <= 0:
            raise ValueError(f"RouterConfig.stale_after_s must be > 0, got {self.stale_after_s}")

    def to_kwargs(self) -> dict[str, Any]:
        """JSON-able form for Serve's `request_router_kwargs`."""
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> RouterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown RouterConfig fields: {unknown}")
        return cls(**kwargs)


@dataclass(frozen=True)
class Candidate:
    replica_id: str
    cached_blocks: int  # leading prompt blocks the replica holds (index view incl. guesses)
    num_requests: int  # running + waiting + in flight, best estimate
    kv_usage: float  # 0..1 from the last report
    is_fresh: bool  # a report younger than stale_after_s
    num_held_blocks: int = 0  # cached GA blocks the replica holds (its events; guesses excluded)


@dataclass(frozen=True)
class RouteDecision:
    ranked: tuple[str, ...]  # most preferred first
    mode: RouteMode
    expected_hit_blocks: int  # cached blocks the top replica is expected to reuse
    top_score: float


def decision_reason(decision: RouteDecision) -> str:
    """The metric label: "prefix" (a cached prefix decided), "load" (nothing cached anywhere it
    went, so load decided), "fallback" (no fresh report: least loaded), or the baseline's name."""
    if decision.mode == "least_loaded":
        return "fallback"
    if decision.mode == "prefix":
        return "prefix" if decision.expected_hit_blocks > 0 else "load"
    return decision.mode


def score(candidate: Candidate, config: RouterConfig) -> float:
    if not candidate.is_fresh:
        return -config.load_weight * candidate.num_requests
    return (
        config.prefix_weight * candidate.cached_blocks
        - config.load_weight * candidate.num_requests
        - config.kv_weight * candidate.kv_usage
    )


def rendezvous_key(tie_key: int, replica_id: str) -> int:
    digest = hashlib.blake2b(tie_key.to_bytes(8, "little") + replica_id.encode("utf-8"), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def rank_prefix(candidates: Sequence[Candidate], config: RouterConfig, tie_key: int) -> RouteDecision:
    """Best score first; least loaded (the same formula, no fresh view) when nobody is fresh."""
    if not candidates:
        raise ValueError("no candidate replicas")
    is_any_fresh = any(c.is_fresh for c in candidates)
    if is_any_fresh:
        scores = {c.replica_id: score(c, config) for c in candidates}
    else:  # least loaded whatever the weights are
        scores = {c.replica_id: -float(c.num_requests) for c in candidates}
    ordered = sorted(
        candidates,
        key=lambda c: (
            -scores[c.replica_id],
            c.num_held_blocks,
            rendezvous_key(tie_key, c.replica_id),
            c.replica_id,
        ),
    )
    top = ordered[0]
    return RouteDecision(
        ranked=tuple(c.replica_id for c in ordered),
        mode="prefix" if is_any_fresh else "least_loaded",
        expected_hit_blocks=top.cached_blocks if top.is_fresh else 0,
        top_score=scores[top.replica_id],
    )


class RoundRobin:
    """Baseline: the next replica in id order after the last one chosen, ignoring everything else."""

    def __init__(self) -> None:
        self._count = 0

    def rank(self, replica_ids: Sequence[str]) -> RouteDecision:
        if not replica_ids:
            raise ValueError("no candidate replicas")
        ids = sorted(replica_ids)
        start = self._count % len(ids)
        self._count += 1
        return RouteDecision(tuple(ids[start:] + ids[:start]), "round_robin", 0, 0.0)


class PowerOfTwo:
    """Baseline: two replicas sampled at random, the one with fewer requests first (ties: id)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def rank(self, candidates: Sequence[Candidate]) -> RouteDecision:
        if not candidates:
            raise ValueError("no candidate replicas")
        ordered = sorted(candidates, key=lambda c: c.replica_id)
        sampled = self._random.sample(ordered, min(2, len(ordered)))
        sampled.sort(key=lambda c: (c.num_requests, c.replica_id))
        return RouteDecision(tuple(c.replica_id for c in sampled), "power_of_two", 0, 0.0)
