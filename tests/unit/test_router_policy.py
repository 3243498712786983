"""Placement policy: prefix vs load scoring, stale fallback, deterministic ties, baselines, config."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from router.policy import (
    Candidate,
    PowerOfTwo,
    RoundRobin,
    RouteDecision,
    RouterConfig,
    decision_reason,
    rank_prefix,
    rendezvous_key,
    score,
)

# the block score and its older tie rule (fewest held blocks, then the first block's rendezvous)
CONFIG = RouterConfig(
    block_size=16, prefix_weight=1.0, load_weight=4.0, kv_weight=8.0, cost="blocks", tie_break="first_block"
)


def cand(
    replica_id: str, cached: int = 0, requests: int = 0, kv: float = 0.0, fresh: bool = True, held: int = 0
) -> Candidate:
    return Candidate(replica_id, cached, requests, kv, fresh, held)


def test_score_is_the_documented_linear_form() -> None:
    """Catches a sign or weight mix-up in the score."""
    assert score(cand("a", cached=10, requests=2, kv=0.5), CONFIG) == 10 - 8 - 4
    assert score(cand("a", cached=10, requests=2, kv=0.5, fresh=False), CONFIG) == -8


def test_cached_prefix_wins_until_the_load_outweighs_it() -> None:
    """Catches a router that ignores the prefix, or one that piles everything onto the holder."""
    idle = cand("idle", requests=0)
    assert rank_prefix([idle, cand("holder", cached=12, requests=2)], CONFIG, 0).ranked == ("holder", "idle")
    # 12 blocks = 12 points; 3 requests = 12 points: a tie broken by the rendezvous order ...
    tied = rank_prefix([idle, cand("holder", cached=12, requests=3)], CONFIG, 0)
    assert tied.top_score == 0.0
    # ... and one more request tips it to the idle replica.
    assert rank_prefix([idle, cand("holder", cached=12, requests=4)], CONFIG, 0).ranked == ("idle", "holder")
    assert rank_prefix([cand("a", kv=0.9), cand("b", kv=0.1)], CONFIG, 0).ranked == ("b", "a")


def test_decision_reports_the_expected_hit_of_the_top_choice() -> None:
    """Catches metrics claiming hits the chosen replica does not have."""
    decision = rank_prefix([cand("a", cached=3), cand("b", cached=7)], CONFIG, 0)
    assert decision == RouteDecision(("b", "a"), "prefix", 7, 7.0)


def test_stale_replicas_get_no_prefix_credit_and_all_stale_is_least_loaded() -> None:
    """Catches routing by a cache view that may be long gone (a replica that stopped reporting)."""
    mixed = rank_prefix([cand("stale", cached=50, fresh=False), cand("fresh", cached=1)], CONFIG, 0)
    assert mixed.ranked == ("fresh", "stale") and mixed.mode == "prefix"
    no_load_weight = RouterConfig(load_weight=0.0, cost="blocks")
    fallback = rank_prefix(
        [cand("a", cached=50, requests=3, fresh=False), cand("b", requests=1, fresh=False)], no_load_weight, 0
    )
    assert fallback == RouteDecision(("b", "a"), "least_loaded", 0, -1.0)


def test_ties_are_deterministic_and_spread_over_replicas() -> None:
    """Catches ties decided by input order (gateways disagree) or always by the same replica."""
    ids = ["r0", "r1", "r2"]
    firsts: Counter[str] = Counter()
    for tie_key in range(300):
        forward = rank_prefix([cand(i) for i in ids], CONFIG, tie_key)
        backward = rank_prefix([cand(i) for i in reversed(ids)], CONFIG, tie_key)
        assert forward == backward
        assert forward.ranked == tuple(sorted(ids, key=lambda i: rendezvous_key(tie_key, i)))
        firsts[forward.ranked[0]] += 1
    assert set(firsts) == set(ids) and min(firsts.values()) >= 70


def test_a_tie_goes_to_the_replica_caching_the_least() -> None:
    """Catches cold prompts piling onto one replica: with scores equal, the replica holding fewer
    cached blocks comes first whatever the rendezvous order says (sglang's smallest-tree rule);
    held blocks never outweigh a score difference."""
    for tie_key in range(50):
        ranked = rank_prefix(
            [cand("home", held=40), cand("empty"), cand("some", held=3)], CONFIG, tie_key
        ).ranked
        assert ranked == ("empty", "some", "home")
    assert rank_prefix([cand("home", held=40), cand("busy", requests=1)], CONFIG, 0).ranked == (
        "home",
        "busy",
    )
    assert rank_prefix([cand("home", cached=1, held=40), cand("empty")], CONFIG, 0).ranked == (
        "home",
        "empty",
    )


def test_decision_reasons_name_what_decided() -> None:
    """Catches metrics that call a load-only or fallback decision a prefix hit."""
    assert decision_reason(rank_prefix([cand("a", cached=2), cand("b")], CONFIG, 0)) == "prefix"
    assert decision_reason(rank_prefix([cand("a", requests=1), cand("b")], CONFIG, 0)) == "load"
    assert decision_reason(rank_prefix([cand("a", fresh=False)], CONFIG, 0)) == "fallback"
    assert decision_reason(RoundRobin().rank(["a"])) == "round_robin"


def test_round_robin_cycles_in_id_order() -> None:
    """Catches a round robin that repeats or skips a replica."""
    rr = RoundRobin()
    firsts = [rr.rank(["b", "c", "a"]).ranked[0] for _ in range(5)]
    assert firsts == ["a", "b", "c", "a", "b"]
    assert rr.rank(["b", "c", "a"]).ranked == ("c", "a", "b")


def test_power_of_two_prefers_the_less_loaded_of_its_sample() -> None:
    """Catches the baseline picking the busier sample, or sampling non-reproducibly with a seed."""
    candidates = [cand("a", requests=5), cand("b", requests=1), cand("c", requests=3)]
    first = [PowerOfTwo(seed=11).rank(candidates).ranked for _ in range(3)]
    assert first[0] == first[1] == first[2]
    p2 = PowerOfTwo(seed=11)
    for _ in range(50):
        ranked = p2.rank(candidates).ranked
        loads = {c.replica_id: c.num_requests for c in candidates}
        assert len(ranked) == 2 and loads[ranked[0]] < loads[ranked[1]]
    assert PowerOfTwo(seed=0).rank([cand("only")]).ranked == ("only",)


def test_config_round_trips_through_serve_kwargs_and_names_bad_fields() -> None:
    """Catches a config that cannot pass through Serve's JSON kwargs, or errors that hide the field."""
    config = RouterConfig(policy="power_of_two", block_size=4, load_weight=2.5, seed=3)
    kwargs = json.loads(json.dumps(config.to_kwargs()))
    assert RouterConfig.from_kwargs(kwargs) == config
    with pytest.raises(ValueError, match=re.escape("unknown RouterConfig fields: ['bogus']")):
        RouterConfig.from_kwargs({"bogus": 1})
    with pytest.raises(ValueError, match=re.escape("RouterConfig.block_size must be >= 1")):
        RouterConfig(block_size=0)
    with pytest.raises(ValueError, match=re.escape("RouterConfig.stale_after_s must be > 0")):
        RouterConfig(stale_after_s=0.0)
    with pytest.raises(ValueError, match=re.escape("RouterConfig.policy must be")):
        RouterConfig(policy="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no candidate replicas"):
        rank_prefix([], CONFIG, 0)
