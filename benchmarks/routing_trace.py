"""The routing benchmark's workload and its arithmetic, as pure functions (no torch, no Ray).

`make_trace(seed)` builds a multi-session, multi-turn chat and agent trace: a few long shared system
prompts, sessions whose histories grow turn by turn (earlier user and assistant messages re-sent, as
chat clients and agents do). Assistant turns in the history are the trace's own text, so every
policy sends byte-identical requests. `summarize` and `compare` turn per-request measurements into
the reported hit rates, TTFT percentiles, throughput and ratios.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.block_hash import block_hashes

# Opening lines of the system prompts: two agents with tool instructions, two chat personas.
SYSTEM_OPENINGS = (
    "You are a coding agent working inside a Python repository. You can call the tools listed "
    "below. Think about which tool answers the question, call it with exact arguments, read the "
    "result, and only then answer. Never invent file contents.",
    "You are a travel and weather assistant with access to live tools. Use them for every fact "
    "that changes over time: weather, exchange rates, flight status, opening hours. Keep answers "
    "short and cite the tool you used.",
    "You are a patient tutor for the Python standard library. Explain with small examples, name "
    "the module and function you mean, and point out the common mistake beginners make with it.",
    "You are a support assistant for a cloud storage product. Be polite and precise, ask for the "
    "account region when it matters, and never promise refunds: hand billing questions to a human.",
)
TOOLS = (
    "read_file", "search_code", "run_tests", "list_directory", "get_weather", "convert_currency",
    "flight_status", "opening_hours", "lookup_docs", "open_ticket", "check_quota", "restore_object",
)  # fmt: skip
TOPICS = (
    "pathlib", "itertools", "collections", "asyncio", "json", "functools", "dataclasses", "logging",
    "subprocess", "datetime", "re", "typing", "argparse", "heapq", "bisect", "statistics",
)  # fmt: skip
PLACES = ("Oslo", "Lima", "Kyoto", "Nairobi", "Quebec", "Perth", "Tallinn", "Porto", "Hanoi", "Cusco")
ASKS = (
    "How do I use {topic} to solve this?",
    "What is the weather in {place} tomorrow?",
    "Please call {tool} for the file src/{topic}_utils.py and summarize it.",
    "Why does my code using {topic} fail with a TypeError?",
    "Convert 120 euros for my trip to {place}.",
    "Can you check the quota of the bucket backups-{place} in region eu-west?",
    "Explain the difference between two functions in {topic}.",
    "Run {tool} again, but only for the tests about {topic}.",
)
REPLIES = (
    "I called {tool} and the answer is below. The short version: it works as documented in {topic}.",
    "Here is what I found for {place}. The tool reported a normal result, nothing unusual today.",
    "The function you need lives in {topic}. Pass the arguments by keyword and check the return.",
    "Done. {tool} finished without errors; tell me if you want the full output or a summary.",
)


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str  # what the history carries as the assistant's reply on later turns


@dataclass(frozen=True)
class Session:
    session_id: int
    system_index: int  # which shared system prompt
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Trace:
    seed: int
    system_prompts: tuple[str, ...]
    sessions: tuple[Session, ...]  # started in this order, `concurrency` at a time

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def _system_prompt(opening: str, rng: random.Random, num_rules: int) -> str:
    rules = []
    for i in range(num_rules):
        tool, topic, place = rng.choice(TOOLS), rng.choice(TOPICS), rng.choice(PLACES)
        rules.append(
            f"Rule {i + 1}: when the request mentions {topic} or {place}, prefer {tool}; pass only the "
            f"arguments its schema lists, and report failures verbatim."
        )
    return opening + "\n" + "\n".join(rules)


def make_trace(
    seed: int = 0,
    num_sessions: int = 28,
    system_weights: Sequence[float] = (0.4, 0.3, 0.2, 0.1),
    min_turns: int = 3,
    max_turns: int = 5,
    rules_per_prompt: Sequence[int] = (14, 10, 12, 8),
) -> Trace:
    """A deterministic trace: the same `seed` and sizes give the same trace in every process.

    Sessions pick a system prompt by `system_weights` (popular agents, rarer personas) and have
    `min_turns`..`max_turns` turns; system prompt i has `rules_per_prompt[i]` rule lines (several
    hundred tokens each at the defaults).
    """
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
    if len(system_weights) != len(rules_per_prompt) or not 1 <= len(system_weights) <= len(SYSTEM_OPENINGS):
        raise ValueError("system_weights and rules_per_prompt need one entry per system prompt (1-4)")
    rng = random.Random(seed)
    prompts = tuple(_system_prompt(SYSTEM_OPENINGS[i], rng, n) for i, n in enumerate(rules_per_prompt))
    sessions = []
    for session_id in range(num_sessions):
        system_index = rng.choices(range(len(prompts)), weights=system_weights)[0]
        turns = []
        for _ in range(rng.randint(min_turns, max_turns)):
            words = {"tool": rng.choice(TOOLS), "topic": rng.choice(TOPICS), "place": rng.choice(PLACES)}
            turns.append(Turn(rng.choice(ASKS).format(**words), rng.choice(REPLIES).format(**words)))
        sessions.append(Session(session_id, system_index, tuple(turns)))
    return Trace(seed, prompts, tuple(sessions))


def nonce_line(nonce: int) -> str:
    """First line of every system prompt of one run: distinct runs share no prefix block, so each
    run starts with caches cold for its prompts (4 digits: one token each, equal lengths)."""
    if not 0 <= nonce <= 9999:
        raise ValueError(f"nonce must be in [0, 9999], got {nonce}")
    return f"Ticket {nonce:04d}."


def messages_for(trace: Trace, session: Session, turn_index: int, nonce: int) -> list[dict[str, str]]:
    """The chat messages of `session`'s turn `turn_index`: system prompt, every earlier turn's user
    and assistant message, then this turn's user message."""
    system = nonce_line(nonce) + " " + trace.system_prompts[session.system_index]
    messages = [{"role": "system", "content": system}]
    for turn in session.turns[:turn_index]:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    messages.append({"role": "user", "content": session.turns[turn_index].user})
    return messages


def ceiling_hit_rate(prompts: Sequence[Sequence[int]], block_size: int) -> float:
    """The best hit rate any router can reach on 1+ replicas: one cache that never evicts, where a
    prompt hits every leading full block some earlier prompt had (the engine's rule: at least one
    token left to compute). Prompts in trace order; greedy outputs are not in later prompts."""
    seen: set[int] = set()
    num_cached = num_tokens = 0
    for token_ids in prompts:
        hashes = block_hashes(token_ids, block_size)
        max_blocks = (len(token_ids) - 1) // block_size
        num_blocks = 0
        while num_blocks < max_blocks and hashes[num_blocks] in seen:
            num_blocks += 1
        num_cached += num_blocks * block_size
        num_tokens += len(token_ids)
        seen.update(hashes)
    return num_cached / num_tokens


@dataclass(frozen=True)
class RequestResult:
    session_id: int
    turn_index: int
    prompt_tokens: int
    cached_tokens: int  # the engine's prefix hit, from usage.prompt_tokens_details
    completion_tokens: int
    ttft_s: float  # request sent -> first streamed chunk
    start_s: float  # relative to the run's start
    end_s: float


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(results: Sequence[RequestResult], wall_s: float) -> dict[str, float]:
    """One run: hit rate = sum(cached) / sum(prompt tokens), TTFT p50/p99 in ms, throughput."""
    if not results or wall_s <= 0:
        raise ValueError("need at least one result and a positive wall time")
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    output = sum(r.completion_tokens for r in results)
    ttft_ms = [r.ttft_s * 1000 for r in results]
    return {
        "num_requests": len(results),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt,
        "ttft_p50_ms": percentile(ttft_ms, 50),
        "ttft_p99_ms": percentile(ttft_ms, 99),
        "requests_per_s": len(results) / wall_s,
        "output_tokens_per_s": output / wall_s,
        "wall_s": wall_s,
    }


CPU_PREFIX = "cpu_ms_per_request_"  # per-run CPU of one serving role (benchmarks/process_cpu.py)
METRICS = ("hit_rate", "ttft_p50_ms", "ttft_p99_ms", "requests_per_s", "output_tokens_per_s")


def median_of_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Median of each metric over runs, with the per-run values beside it; the median CPU per
    request of each serving role when the runs measured it."""
    if not runs:
        raise ValueError("no runs")
    out: dict[str, Any] = {m: statistics.median(r[m] for r in runs) for m in METRICS}
    out["runs"] = {m: [round(r[m], 4) for r in runs] for m in METRICS}
    out["prompt_tokens"] = runs[0]["prompt_tokens"]
    cpu_keys = sorted({k for r in runs for k in r if k.startswith(CPU_PREFIX)})
    if cpu_keys:  # a role missing from a run (no such process then) spent nothing in it
        out["cpu_ms_per_request"] = {
            k.removeprefix(CPU_PREFIX): round(statistics.median(r.get(k, 0.0) for r in runs), 2)
            for k in cpu_keys
        }
    return out


def compare(policies: Mapping[str, Mapping[str, Any]], oracle: str, ours: str) -> dict[str, dict[str, float]]:
    """Per policy: hit rate over the oracle's and over ours, TTFT p99 over ours, throughput over ours."""
    base, mine = policies.get(oracle), policies.get(ours)
    ratios: dict[str, dict[str, float]] = {}
    for name, row in policies.items():
        r: dict[str, float] = {}
        if base is not None and base["hit_rate"] > 0:
            r["hit_rate_over_oracle"] = round(row["hit_rate"] / base["hit_rate"], 4)
        if mine is not None:
            if mine["hit_rate"] > 0:
                r["hit_rate_over_ours"] = round(row["hit_rate"] / mine["hit_rate"], 4)
            r["ttft_p99_over_ours"] = round(row["ttft_p99_ms"] / mine["ttft_p99_ms"], 4)
            r["requests_per_s_over_ours"] = round(row["requests_per_s"] / mine["requests_per_s"], 4)
        ratios[name] = r
    return ratios


def goal_check(
    policies: Mapping[str, Mapping[str, Any]],
    oracle: str,
    ours: str,
    ceiling: float,
    min_oracle_fraction: float = 0.95,
    own: Sequence[str] = (),
) -> dict[str, bool]:
    """The issue's goals over routers that face the same replicas: hit rate >= 95% of the oracle's
    and above every peer (no router can exceed `ceiling`, one never-evicting cache, so a peer that
    also reaches it ties: reported apart), TTFT p99 the lowest (the oracle is a reference, not a
    peer; `own` names our other configurations, which are not peers either)."""
    mine = policies[ours]
    peers = [p for n, p in policies.items() if n not in (ours, oracle, *own)]
    at_ceiling = mine["hit_rate"] >= ceiling - 1e-9
    return {
        "hit_rate_at_least_95pct_of_oracle": oracle in policies
        and mine["hit_rate"] >= min_oracle_fraction * policies[oracle]["hit_rate"],
        "hit_rate_above_every_peer": all(mine["hit_rate"] > p["hit_rate"] for p in peers),
        "hit_rate_at_ceiling": at_ceiling,
        "hit_rate_above_every_peer_or_at_ceiling": at_ceiling
        or all(mine["hit_rate"] > p["hit_rate"] for p in peers),
        "ttft_p99_lowest": all(mine["ttft_p99_ms"] <= p["ttft_p99_ms"] for p in peers),
    }
