"""The time-unit cost (router/policy.py `expected_ttft`): each term pinned to its formula, measured
rates over defaults, stale replicas, and the tie-break that spreads requests sharing a prefix."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from router.policy import Candidate, RouterConfig, expected_ttft, rank_prefix, tie_key_of

TIME = RouterConfig(block_size=16, default_step_s=0.01, default_prefill_tokens_per_s=1000.0)


def cand(
    replica_id: str,
    cached: int = 0,
    requests: int = 0,
    kv: float = 0.0,
    fresh: bool = True,
    tokens: int = 321,
    step_s: float | None = None,
    rate: float | None = None,
) -> Candidate:
    return Candidate(replica_id, cached, requests, kv, fresh, 0, tokens, step_s, rate)


def test_the_wait_term_is_requests_times_the_measured_step_time() -> None:
    """Catches a load term in the wrong unit (counts, not seconds) or ignoring the replica's
    measured step time in favour of the default."""
    assert expected_ttft(cand("a", requests=3), TIME).wait_s == pytest.approx(0.03)  # default 10 ms
    assert expected_ttft(cand("a", requests=3, step_s=0.05), TIME).wait_s == pytest.approx(0.15)
    assert expected_ttft(cand("a", requests=3, step_s=0.0), TIME).wait_s == pytest.approx(0.03)  # unmeasured


def test_the_prefill_term_is_uncached_tokens_over_the_measured_rate() -> None:
    """Catches counting cached tokens as work, a rate inverted, or a full hit costing nothing (the
    engine always computes at least one prompt token)."""
    assert expected_ttft(cand("a", cached=10, tokens=321), TIME).prefill_s == pytest.approx(
        (321 - 160) / 1000
    )
    assert expected_ttft(cand("a", cached=10, tokens=321, rate=2000.0), TIME).prefill_s == pytest.approx(
        0.0805
    )
    assert expected_ttft(cand("a", cached=20, tokens=320), TIME).prefill_s == pytest.approx(1 / 1000)


def test_the_kv_term_scales_the_prefill_by_kv_usage() -> None:
    """Catches a KV term that penalizes a replica the request barely adds blocks to, or one not
    in seconds."""
    terms = expected_ttft(cand("a", cached=10, tokens=321, kv=0.5), TIME)
    assert terms.kv_s == pytest.approx(0.5 * terms.prefill_s)
    assert expected_ttft(cand("a", kv=1.7), TIME).kv_s == pytest.approx(
        expected_ttft(cand("a"), TIME).prefill_s
    )
    assert terms.total_s == pytest.approx(terms.wait_s + terms.prefill_s + terms.kv_s)


def test_a_stale_replica_counts_as_caching_nothing_and_adds_no_kv_term() -> None:
    """Catches routing to a cached prefix the router can no longer vouch for."""
    terms = expected_ttft(cand("a", cached=10, tokens=321, kv=0.9, fresh=False), TIME)
    assert (terms.prefill_s, terms.kv_s) == (pytest.approx(0.321), 0.0)


def test_the_lower_expected_ttft_wins_in_seconds_not_blocks() -> None:
    """Catches prefix outweighing load by construction: 5 cached blocks (80 tokens, 80 ms at 1000
    tokens/s) are worth 8 queued requests at 10 ms a step, not 9 (and a slow replica's steps
    count for more)."""
    idle, holder = cand("idle"), cand("holder", cached=5, requests=7)
    assert rank_prefix([idle, holder], TIME, 0).ranked == ("holder", "idle")  # 70 < 80 ms saved
    busier = cand("holder", cached=5, requests=9)
    assert rank_prefix([idle, busier], TIME, 0).ranked == ("idle", "holder")  # 90 > 80 ms saved
    slow = cand("holder", cached=5, requests=7, step_s=0.02)
    assert rank_prefix([idle, slow], TIME, 0).ranked == ("idle", "holder")


def test_the_tie_key_is_the_first_block_no_replica_holds() -> None:
    """Catches a tie key that is constant for every prompt sharing a system prompt (every request
    would then rank the replicas in one fixed order)."""
    hashes = [11, 12, 13, 14]
    shared = [cand("a", cached=2), cand("b", cached=2), cand("c", cached=1, fresh=False)]
    assert tie_key_of(shared, hashes, fallback=99, tie_break="distinct") == 13
    assert tie_key_of(shared, hashes, fallback=99, tie_break="first_block") == 11
    assert tie_key_of([cand("a", cached=9)], hashes, fallback=99, tie_break="distinct") == 14
    assert tie_key_of(shared, [], fallback=99, tie_break="distinct") == 99


def test_sessions_sharing_a_system_prompt_spread_over_tied_replicas() -> None:
    """Catches ties decided by the shared first block: 200 sessions whose prompts share 4 cached
    blocks and differ from block 4 on must not all go to one replica."""
    firsts: Counter[str] = Counter()
    for session in range(200):
        hashes = [1, 2, 3, 4, 1000 + session]
        candidates = [cand(r, cached=4, tokens=90) for r in ("r0", "r1", "r2", "r3")]
        key = tie_key_of(candidates, hashes, fallback=0, tie_break="distinct")
        firsts[rank_prefix(candidates, TIME, key).ranked[0]] += 1
    assert len(firsts) == 4 and min(firsts.values()) >= 30


def test_costs_within_the_tolerance_tie_and_beyond_it_do_not() -> None:
    """Catches measured-rate noise (a 1% faster prefill) deciding every tie, a tolerance so wide
    that a real difference (one queued request, 10 ms) is ignored, or a cached block (a session's
    home) lost to the tolerance on a short prompt."""
    fast, slow = cand("fast", rate=1010.0), cand("slow", rate=1000.0)  # 317.8 vs 321 ms: apart
    near_fast = cand("fast", tokens=100, rate=1010.0)  # 99.0 vs 100 ms: within 2 ms
    near_slow = cand("slow", tokens=100, rate=1000.0)
    winners = {rank_prefix([near_fast, near_slow], TIME, key).ranked[0] for key in range(40)}
    assert winners == {"fast", "slow"}
    assert {rank_prefix([fast, slow], TIME, key).ranked[0] for key in range(40)} == {"fast"}
    busy = cand("slow", tokens=100, requests=1, rate=1000.0)
    assert {rank_prefix([near_fast, busy], TIME, key).ranked[0] for key in range(40)} == {"fast"}
    home, away = (
        cand("home", cached=1, tokens=17, rate=1e4),
        cand("away", tokens=17, rate=1e4),
    )  # 0.1 vs 1.7 ms
    assert {rank_prefix([home, away], TIME, key).ranked[0] for key in range(40)} == {"home"}


def test_config_rejects_unknown_cost_and_bad_rates() -> None:
    """Catches a typo in the cost name or a zero default rate passing silently (division by zero
    at the first request)."""
    with pytest.raises(ValueError, match=re.escape("RouterConfig.cost must be")):
        RouterConfig(cost="seconds")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("RouterConfig.default_prefill_tokens_per_s must be > 0")):
        RouterConfig(default_prefill_tokens_per_s=0.0)
    with pytest.raises(ValueError, match=re.escape("RouterConfig.tie_break must be")):
        RouterConfig(tie_break="random")  # type: ignore[arg-type]
