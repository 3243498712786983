"""The routing benchmark's pure parts: the trace generator, its aggregation, and the adapter that
gives Ray's prefix router the prompt (benchmarks/routing_trace.py, benchmarks/ray_prefix_router.py)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.routing_trace import (
    RequestResult,
    ceiling_hit_rate,
    compare,
    goal_check,
    make_trace,
    median_of_runs,
    messages_for,
    nonce_line,
    percentile,
    summarize,
)


def test_trace_is_deterministic_and_shaped_as_asked() -> None:
    """Catches a trace that differs between processes or runs (policies would replay different
    workloads) or ignores its size arguments."""
    trace = make_trace(3, num_sessions=10, min_turns=2, max_turns=4)
    assert trace == make_trace(3, num_sessions=10, min_turns=2, max_turns=4)
    assert trace != make_trace(4, num_sessions=10, min_turns=2, max_turns=4)
    assert [s.session_id for s in trace.sessions] == list(range(10))
    assert all(2 <= len(s.turns) <= 4 for s in trace.sessions)
    assert trace.num_requests == sum(len(s.turns) for s in trace.sessions)
    assert len(trace.system_prompts) == 4
    assert trace.system_prompts[0].count("\nRule ") == 14  # rules_per_prompt default (14, 10, 12, 8)


def test_history_grows_and_prefixes_are_shared() -> None:
    """Catches a trace without the structure prefix routing exploits: each turn must re-send the
    previous turn's messages unchanged, and sessions on one system prompt must share it."""
    trace = make_trace(0, num_sessions=12)
    session = trace.sessions[0]
    turns = [messages_for(trace, session, k, nonce=7) for k in range(len(session.turns))]
    for k in range(1, len(turns)):
        assert turns[k][: len(turns[k - 1])] == turns[k - 1]
        assert len(turns[k]) == len(turns[k - 1]) + 2
        assert turns[k][-2] == {"role": "assistant", "content": session.turns[k - 1].assistant}
    assert turns[0][0]["content"] == "Ticket 0007. " + trace.system_prompts[session.system_index]
    same = [s for s in trace.sessions if s.system_index == session.system_index][1]
    assert messages_for(trace, same, 0, 7)[0] == turns[0][0]


def test_nonce_line_has_fixed_width() -> None:
    """Catches run nonces of different lengths (prompt token counts would differ between runs)."""
    assert nonce_line(7) == "Ticket 0007."
    assert nonce_line(9999) == "Ticket 9999."
    with pytest.raises(ValueError):
        nonce_line(10000)


def _result(prompt: int, cached: int, ttft_s: float, completion: int = 4) -> RequestResult:
    return RequestResult(0, 0, prompt, cached, completion, ttft_s, 0.0, 1.0)


def test_summarize_weights_hit_rate_by_tokens() -> None:
    """Catches a hit rate averaged per request (a short prompt's full hit would count like a long
    prompt's) and TTFT/throughput in the wrong units."""
    results = [_result(100, 96, 0.010), _result(300, 0, 0.050), _result(100, 64, 0.030)]
    s = summarize(results, wall_s=2.0)
    assert s["hit_rate"] == 160 / 500
    assert s["ttft_p50_ms"] == pytest.approx(30.0)
    assert s["ttft_p99_ms"] == pytest.approx(49.6)  # 30 + (50 - 30) * 0.98
    assert s["requests_per_s"] == 1.5
    assert s["output_tokens_per_s"] == 6.0


def test_percentile_interpolates_like_numpy() -> None:
    """Catches an off-by-one rank (p99 of a few values would jump to the max or miss it)."""
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0


def test_medians_ratios_and_goals() -> None:
    """Catches ratios taken against the wrong policy and goals that pass when a peer is better."""
    runs = [
        {"hit_rate": 0.8, "ttft_p50_ms": 10, "ttft_p99_ms": 90, "requests_per_s": 4, "output_tokens_per_s": 90, "prompt_tokens": 500},
        {"hit_rate": 0.9, "ttft_p50_ms": 30, "ttft_p99_ms": 70, "requests_per_s": 5, "output_tokens_per_s": 80, "prompt_tokens": 500},
        {"hit_rate": 0.7, "ttft_p50_ms": 20, "ttft_p99_ms": 80, "requests_per_s": 3, "output_tokens_per_s": 70, "prompt_tokens": 500},
    ]  # fmt: skip
    ours = median_of_runs(runs)
    assert (ours["hit_rate"], ours["ttft_p50_ms"], ours["ttft_p99_ms"]) == (0.8, 20, 80)
    assert ours["runs"]["hit_rate"] == [0.8, 0.9, 0.7]
    assert "cpu_ms_per_request" not in ours  # not measured: not reported as zero
    runs[0] |= {"cpu_ms_per_request_gateway": 9.0, "cpu_ms_per_request_serve_proxy": 5.0}
    runs[1] |= {"cpu_ms_per_request_gateway": 7.0}  # no proxy process in this run: it spent nothing
    runs[2] |= {"cpu_ms_per_request_gateway": 8.0, "cpu_ms_per_request_serve_proxy": 6.0}
    assert median_of_runs(runs)["cpu_ms_per_request"] == {"gateway": 8.0, "serve_proxy": 5.0}
    policies: dict[str, dict[str, object]] = {
        "oracle": {"hit_rate": 0.82, "ttft_p99_ms": 100.0, "requests_per_s": 4.0, "harness": "a"},
        "ours": {"hit_rate": 0.8, "ttft_p99_ms": 80.0, "requests_per_s": 4.0, "harness": "a"},
        "rr": {"hit_rate": 0.4, "ttft_p99_ms": 200.0, "requests_per_s": 2.0, "harness": "a"},
    }
    ratios = compare(policies, "oracle", "ours")
    assert ratios["rr"] == {
        "hit_rate_over_oracle": round(0.4 / 0.82, 4),
        "hit_rate_over_ours": 0.5,
        "ttft_p99_over_ours": 2.5,
        "requests_per_s_over_ours": 0.5,
    }
    assert goal_check(policies, "oracle", "ours", ceiling=0.9) == {
        "hit_rate_at_least_95pct_of_oracle": True,
        "hit_rate_above_every_peer": True,
        "hit_rate_at_ceiling": False,
        "hit_rate_above_every_peer_or_at_ceiling": True,
        "ttft_p99_lowest": True,
    }
    policies["peer"] = {"hit_rate": 0.8, "ttft_p99_ms": 79.0, "requests_per_s": 4.0, "harness": "a"}
    assert goal_check(policies, "oracle", "ours", ceiling=0.9) == {
        "hit_rate_at_least_95pct_of_oracle": True,
        "hit_rate_above_every_peer": False,  # a tie is not above
        "hit_rate_at_ceiling": False,
        "hit_rate_above_every_peer_or_at_ceiling": False,  # a tie below the ceiling is no excuse
        "ttft_p99_lowest": False,
    }
    # both at the ceiling: nobody can be above it, so the tie is the best possible
    assert goal_check(policies, "oracle", "ours", ceiling=0.8)["hit_rate_above_every_peer_or_at_ceiling"]
    # our other configuration is not a peer: the faster "peer" named as ours no longer counts
    own = goal_check(policies, "oracle", "ours", ceiling=0.9, own=["peer"])
    assert own["ttft_p99_lowest"] and own["hit_rate_above_every_peer"]


def test_ray_router_sees_the_token_prompt() -> None:
    """Catches Ray's prefix router being handed no prompt (it silently falls back to power of two)
    or a text on which different token prefixes or tenants would look alike."""
    pytest.importorskip("ray")
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from benchmarks.ray_prefix_router import PromptArg, prompt_text, with_prompt

    assert prompt_text([65, 0xD800, 0x10000], None) == "A" + chr(0xE000) + chr(0x10800)
    assert prompt_text([1, 2], "tenant") == "tenant\x00\x01\x02"

    async def pending() -> PendingRequest:  # its future needs a running loop, as in the router
        return PendingRequest(
            args=[],
            kwargs={"prompt_token_ids": [72, 105], "salt": None, "params": {}, "request_id": "r"},
            metadata=RequestMetadata(request_id="r", internal_request_id="i"),
        )

    request = asyncio.run(pending())
    view = with_prompt(request)
    assert view is not None and view.args == [PromptArg("Hi")]
    assert view.kwargs is request.kwargs and view.future is request.future and request.args == []


def test_ceiling_counts_only_blocks_an_earlier_prompt_had() -> None:
    """Catches a ceiling that counts partial blocks, the last token (always computed), or prompts
    against themselves (it would promise hits no router can deliver)."""
    a = list(range(40))  # blocks of 16: [0-15], [16-31], 8 tokens left over
    b = list(range(32)) + [99] * 8  # shares both full blocks of a
    c = list(range(33))  # shares 2 blocks, but 32 = the whole prompt minus one: 2 blocks allowed
    d = list(range(32))  # shares 2 blocks, yet one token must be computed: 1 block
    assert ceiling_hit_rate([a], 16) == 0.0
    assert ceiling_hit_rate([a, b], 16) == 32 / 80
    assert ceiling_hit_rate([a, c], 16) == 32 / 73
    assert ceiling_hit_rate([a, d], 16) == 16 / 72
