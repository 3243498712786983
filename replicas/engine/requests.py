"""Engine requests as the scheduler sees them, and the plain dataclasses of one engine step.

The scheduler and the model runner talk only through these: a `StepPlan` in, a `StepOutput`
out, and the scheduler turns the output into `RequestUpdate`s for the streams.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protocol.messages import FinishReason


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were taken; recomputes from 0
    FINISHED = "finished"


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int  # generated tokens at most
    stop_token_ids: frozenset[int] = frozenset()  # eos included by the caller unless ignore_eos
    priority: int = 0  # lower is served sooner; ties go to the earlier arrival
    salt: str | None = None  # prefix-cache tenant: different salts never share blocks

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"prompt_token_ids of {self.request_id!r} is empty")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens of {self.request_id!r} must be >= 1, got {self.max_tokens}")


@dataclass(eq=False)  # identity: the scheduler finds states in its queues with `in` / `remove`
class RequestState:
    """One request's mutable progress; only the scheduler writes it."""

    request: EngineRequest
    arrival_index: int  # order of `add`; kept through preemption so a preempted request goes first
    all_token_ids: list[int]  # prompt then accepted outputs (never drafts)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # leading tokens whose KV is written and final
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    is_admitted_once: bool = False
    num_preemptions: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # proposed by the runner for next step
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of all_token_ids' full blocks
    finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.request.priority, self.arrival_index)


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's work in a step; position p maps to block_table[p // B], slot p % B."""

    request_id: str
    token_ids: list[int]  # fed at start_position, start_position + 1, ...; drafts (if any) last
    start_position: int  # = num_computed_tokens: first position fed (and first query)
    block_table_full: list[int]  # GA pool, covers every position up to the last lookahead slot
    block_table_swa: list[int | None]  # SWA pool; None for blocks out of every future window
    is_prefill_chunk: bool  # False only for a decode: the last sampled token plus drafts
    is_last_chunk: bool  # sample after the last token (verifying drafts); else no output
    draft_token_ids: list[int]  # = token_ids[-len(draft_token_ids):], to verify
    num_lookahead_slots: int  # positions past token_ids reserved for MTP draft KV


@dataclass(frozen=True)
class StepPlan:
    scheduled: list[ScheduledSeq]
    preempted_ids: list[str]  # freed this step: drop any per-request runner state
    finished_ids: list[str]  # finished, aborted or failed since the last plan: drop their state

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(seq.token_ids) for seq in self.scheduled)


@dataclass(frozen=True)
class SeqOutput:
    request_id: str
    sampled_token_ids: list[int]  # accepted drafts, then one sampled token; [] for a non-last chunk
    draft_token_ids: list[int] = field(default_factory=list)  # proposals for the next step
    extras: object | None = None  # logprobs etc., passed through to the update untouched


@dataclass(frozen=True)
class StepOutput:
    seqs: list[SeqOutput]


@dataclass(frozen=True)
class RequestUpdate:
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None  # None while the request goes on
    num_prompt_tokens: int
    num_cached_tokens: int
    extras: object | None = None
    error: str | None = None  # set with finish_reason "error"


def check_seq_output(seq: ScheduledSeq, seq_output: SeqOutput | None) -> None:
    """A sampling step returns 1 + (accepted drafts) tokens whose leading ones equal the drafts."""
    if not seq.is_last_chunk:
        return
    if seq_output is None:
        raise ValueError(f"no output for {seq.request_id!r}, scheduled to sample")
    sampled = seq_output.sampled_token_ids
    if not 1 <= len(sampled) <= 1 + len(seq.draft_token_ids):
        raise ValueError(f"{seq.request_id!r}: {len(sampled)} tokens for {len(seq.draft_token_ids)} drafts")
    if sampled[:-1] != seq.draft_token_ids[: len(sampled) - 1]:
        raise ValueError(f"{seq.request_id!r}: accepted tokens differ from the drafts")
