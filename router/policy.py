"""Pure placement policies: prefix-aware scoring, its least-loaded fallback, and two baselines.

The prefix policy's default cost (`cost="time"`) is a replica's expected time to first token, in
seconds, from its measured rates (`expected_ttft`):
    wait_s    = num_requests * step_s                 (each request ahead costs about one engine step)
    prefill_s = uncached_prompt_tokens / prefill_tokens_per_s
    kv_s      = kv_usage * prefill_s                  (a block allocated on a replica whose KV is a
                fraction f in use evicts, with probability about f, a cached block someone's hit needs)
`step_s` and `prefill_tokens_per_s` come from the replica's report when it measures them, else
from `RouterConfig.default_step_s` / `default_prefill_tokens_per_s` (calibrated on the tiny model by
`benchmarks/routing_calibrate.py`; docs/routing.md). The older `cost="blocks"` score is
prefix_weight * cached_blocks - load_weight * num_requests - kv_weight * kv_usage.
A replica whose report is missing or older than `stale_after_s` is scored with nothing cached and
no KV term; when no candidate is fresh the ranking is plain least loaded.

Ties (the same requests and cached blocks, costs within `tie_tolerance_s`) go by a rendezvous hash
of (tie key, replica id), where the tie key is the request's distinguishing block
(`tie_break="distinct"`: the first block no replica is known to hold, so sessions sharing a system
prompt spread instead of all ranking the replicas in one order), deterministic across gateways. `tie_break="first_block"` keeps the older rule: the
replica holding the fewest cached blocks, then the rendezvous hash of the prompt's first block.
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
CostName = Literal["time", "blocks"]
TieBreak = Literal["distinct", "first_block"]


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
    share_loads: bool = True  # with a route board, also share in-flight counts (router.peer_loads)
    cost: CostName = "time"  # "time": expected TTFT in seconds; "blocks": the weighted block score
    # used when a replica's report carries no measured rates (benchmarks/routing_calibrate.py, this host)
    default_step_s: float = 0.0087  # the tiny model's decode step at 8 sequences, one thread
    default_prefill_tokens_per_s: float = 4694.0  # its 512-token prefill chunk, one thread
    # expected TTFTs this close are a tie when requests and cached blocks are equal (time cost only)
    tie_tolerance_s: float = 0.002
    tie_break: TieBreak = "distinct"
    # count a replica's least recently used blocks as gone, as many as its eviction rate says it
    # evicted since the report (router.prefix_index). Off: in the replay it was wrong as often as
    # right, since a router cannot tell which blocks running requests hold (docs/routing.md)
    eviction_aware: bool = False

    def __post_init__(self) -> None:
        if self.load_source not in ("handle", "reports"):
            raise ValueError(f"RouterConfig.load_source must be handle or reports, got {self.load_source!r}")
        if self.cost not in ("time", "blocks"):
            raise ValueError(f"RouterConfig.cost must be time or blocks, got {self.cost!r}")
        if self.tie_break not in ("distinct", "first_block"):
            raise ValueError(
                f"RouterConfig.tie_break must be distinct or first_block, got {self.tie_break!r}"
            )
        for name in ("default_step_s", "default_prefill_tokens_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RouterConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.policy not in ("prefix", "round_robin", "power_of_two"):
            raise ValueError(
                f"RouterConfig.policy must be prefix, round_robin or power_of_two, got {self.policy!r}"
            )
        for name in ("block_size", "max_hashed_blocks", "hash_chunk_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_routing_wait_s <= 0:
            raise ValueError(f"RouterConfig.max_routing_wait_s must be > 0, got {self.max_routing_wait_s}")
        for name in ("prefix_weight", "load_weight", "kv_weight", "guess_ttl_s", "tie_tolerance_s"):
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
    num_prompt_tokens: int = 0  # the request's prompt (the time cost's uncached tokens)
    step_s: float | None = None  # the replica's measured engine step time (None: not reported)
    prefill_tokens_per_s: float | None = None  # its measured prefill rate (None: not reported)


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


@dataclass(frozen=True)
class TtftTerms:
    """The time cost's parts, in seconds (their sum is the expected time to first token)."""

    wait_s: float
    prefill_s: float
    kv_s: float

    @property
    def total_s(self) -> float:
        return self.wait_s + self.prefill_s + self.kv_s


def expected_ttft(candidate: Candidate, config: RouterConfig) -> TtftTerms:
    """Expected time to first token on the candidate (module docstring); a stale replica counts as
    caching nothing and adds no KV term. At least one prompt token is always computed."""
    c = candidate
    step_s = c.step_s if c.step_s is not None and c.step_s > 0 else config.default_step_s
    rate = c.prefill_tokens_per_s
    rate = rate if rate is not None and rate > 0 else config.default_prefill_tokens_per_s
    cached_tokens = c.cached_blocks * config.block_size if c.is_fresh else 0
    prefill_s = max(1, c.num_prompt_tokens - cached_tokens) / rate
    kv_s = min(1.0, max(0.0, c.kv_usage)) * prefill_s if c.is_fresh else 0.0
    return TtftTerms(c.num_requests * step_s, prefill_s, kv_s)


def score(candidate: Candidate, config: RouterConfig) -> float:
    """Higher is better: minus the expected TTFT in seconds (`cost="time"`), or the block score."""
    if config.cost == "time":
        return -expected_ttft(candidate, config).total_s
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


def tie_key_of(
    candidates: Sequence[Candidate], hashes: Sequence[int], fallback: int, tie_break: TieBreak
) -> int:
    """The rendezvous key of a request: its first block no fresh candidate is known to hold
    ("distinct": past a prefix every replica shares, where requests start to differ), or its first
    block ("first_block"); `fallback` (the salt's root hash) for a prompt without a full block."""
    if not hashes:
        return fallback
    if tie_break == "first_block":
        return hashes[0]
    shared = max((c.cached_blocks for c in candidates if c.is_fresh), default=0)
    return hashes[min(shared, len(hashes) - 1)]


def rank_prefix(candidates: Sequence[Candidate], config: RouterConfig, tie_key: int) -> RouteDecision:
    """Best score first; least loaded (the same formula, no fresh view) when nobody is fresh."""
    if not candidates:
        raise ValueError("no candidate replicas")
    is_any_fresh = any(c.is_fresh for c in candidates)
    if is_any_fresh:
        scores = {c.replica_id: score(c, config) for c in candidates}
    else:  # least loaded whatever the weights are
        scores = {c.replica_id: -float(c.num_requests) for c in candidates}
    if config.tie_break == "first_block":
        ordered = sorted(
            candidates,
            key=lambda c: (
                -scores[c.replica_id],
                c.num_held_blocks,
                rendezvous_key(tie_key, c.replica_id),
                c.replica_id,
            ),
        )
    else:
        ordered = _spread_ties(candidates, scores, config, tie_key, is_any_fresh)
    top = ordered[0]
    return RouteDecision(
        ranked=tuple(c.replica_id for c in ordered),
        mode="prefix" if is_any_fresh else "least_loaded",
        expected_hit_blocks=top.cached_blocks if top.is_fresh else 0,
        top_score=scores[top.replica_id],
    )


def _spread_ties(
    candidates: Sequence[Candidate],
    scores: dict[str, float],
    config: RouterConfig,
    tie_key: int,
    is_fresh: bool,
) -> list[Candidate]:
    """Best score first; the candidates tied with the best first, in rendezvous order of `tie_key`.
    Tied: the same requests and cached blocks as the best, and a time cost within `tie_tolerance_s`
    (measured rates differ by noise; a cached block never does) or an equal block score."""
    ordered = sorted(candidates, key=lambda c: (-scores[c.replica_id], c.replica_id))
    tolerance = config.tie_tolerance_s if is_fresh and config.cost == "time" else 0.0
    best = ordered[0]

    def state(c: Candidate) -> tuple[int, int]:
        return c.num_requests, c.cached_blocks if c.is_fresh else 0

    is_tied = [
        c is best or (state(c) == state(best) and scores[best.replica_id] - scores[c.replica_id] <= tolerance)
        for c in ordered
    ]
    tied = sorted(
        (c for c, t in zip(ordered, is_tied, strict=True) if t),
        key=lambda c: (rendezvous_key(tie_key, c.replica_id), c.replica_id),
    )
    return tied + [c for c, t in zip(ordered, is_tied, strict=True) if not t]


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
