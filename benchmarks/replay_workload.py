"""The routing replay's workloads: the routing benchmark's own traces as token blocks, with arrivals.

Two traces from `benchmarks/routing_trace.make_trace`, rendered and tokenized exactly as the gateway
does (the tiny model's tokenizer and chat template): "multi_turn" (the live benchmark's generator:
3-5 turns per session over 4 shared system prompts) and "long_session" (the same generator with
12-24 turns per session, so histories grow long). Sessions start as a Poisson process; a session's
next turn is sent an exponential think time after its previous answer ends; answers are 32-160
tokens. All seeded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from benchmarks.replay_sim import Turn, Workload
from benchmarks.routing_trace import Trace, make_trace, messages_for
from protocol.block_hash import block_hashes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "mimo-tiny"


@dataclass(frozen=True)
class TraceShape:
    num_sessions: int
    min_turns: int
    max_turns: int
    sessions_per_s: float  # Poisson arrivals of new sessions
    think_mean_s: float = 2.0
    min_output_tokens: int = 32
    max_output_tokens: int = 160


TRACES = {
    "multi_turn": TraceShape(num_sessions=2400, min_turns=3, max_turns=5, sessions_per_s=11.0),
    "long_session": TraceShape(num_sessions=600, min_turns=12, max_turns=24, sessions_per_s=2.0),
}


def tokenized_sessions(trace: Trace) -> list[list[list[int]]]:
    """Every session's prompts (token ids), turn by turn, as the gateway renders them."""
    from gateway.chat import render_chat
    from gateway.schemas import ChatCompletionRequest
    from mimo.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(TINY)
    sessions = []
    for session in trace.sessions:
        prompts = []
        for k in range(len(session.turns)):
            messages = messages_for(trace, session, k, nonce=0)
            body = ChatCompletionRequest.model_validate({"model": "mimo-tiny", "messages": messages})
            prompts.append(render_chat(body, tokenizer).prompt_token_ids)
        sessions.append(prompts)
    return sessions


def make_workload(sessions: list[list[list[int]]], shape: TraceShape, block_size: int, seed: int) -> Workload:
    """Arrivals, think times and answer lengths drawn from `seed` over tokenized sessions."""
    rng = random.Random(seed)
    start, starts, turns_of = 0.0, [], []
    for prompts in sessions:
        start += rng.expovariate(shape.sessions_per_s)
        starts.append(start)
        turns = []
        for k, token_ids in enumerate(prompts):
            think_s = rng.expovariate(1 / shape.think_mean_s) if k else 0.0
            num_output = rng.randint(shape.min_output_tokens, shape.max_output_tokens)
            hashes = tuple(block_hashes(token_ids, block_size))
            turns.append(Turn(hashes, len(token_ids), num_output, think_s))
        turns_of.append(tuple(turns))
    return Workload(tuple(starts), tuple(turns_of))


def trace_sessions(name: str, seed: int) -> list[list[list[int]]]:
    shape = TRACES[name]
    return tokenized_sessions(
        make_trace(seed, shape.num_sessions, min_turns=shape.min_turns, max_turns=shape.max_turns)
    )
