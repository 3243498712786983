"""Continuous batching: which requests run this step, how many tokens each, and with which blocks.

Each step serves running decodes first, then running prefill chunks, then admits waiting requests
by (priority, arrival) while the token budget, the sequence cap and the KV blocks allow. A step
with no decode to serve may take longer prefill chunks (`long_prefill_chunk`): nobody waits on
its latency. When blocks run out the lowest-priority, latest running request is preempted by recompute.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from protocol.block_hash import next_block_hashes
from replicas.engine.kv_cache import KVCacheManager
from replicas.engine.kv_layout import swa_blocks_per_seq
from replicas.engine.requests import (
    EngineRequest,
    FinishReason,
    RequestState,
    RequestStatus,
    RequestUpdate,
    ScheduledSeq,
    SeqOutput,
    StepOutput,
    StepPlan,
    check_seq_output,
)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # running requests at most
    max_num_batched_tokens: int  # tokens fed per step, drafts included
    max_prefill_chunk: int  # prompt tokens of one request per step at most
    block_size: int
    max_model_len: int  # prompt + generated tokens at most
    num_lookahead_tokens: int = 0  # MTP draft slots per sampling step (drafts are capped at it)
    # prompt tokens of one request, and tokens of the whole step, at most in a step that serves no
    # decode (0: max_prefill_chunk and max_num_batched_tokens always). Longer chunks pay the per-step
    # costs (weights read, the GA keys gathered per layer) fewer times; with a decode running the
    # step keeps the short chunk, so a decode waits at most one short step.
    long_prefill_chunk: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_prefill_chunk",
            "block_size",
            "max_model_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_lookahead_tokens < 0 or self.long_prefill_chunk < 0:
            raise ValueError(
                "num_lookahead_tokens and long_prefill_chunk must be >= 0, got "
                f"{self.num_lookahead_tokens}, {self.long_prefill_chunk}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs, or decodes could starve")

    @property
    def max_step_tokens(self) -> int:
        """Most tokens any step feeds: the budget of a step without decodes if that is larger."""
        return max(self.max_num_batched_tokens, self.long_prefill_chunk)

    @property
    def max_step_positions_per_seq(self) -> int:
        """Most KV positions one request writes in a step: its tokens plus lookahead slots."""
        max_chunk = max(self.max_prefill_chunk, self.long_prefill_chunk)
        num_fed = max(min(max_chunk, self.max_step_tokens), 1 + self.num_lookahead_tokens)
        return num_fed + self.num_lookahead_tokens


@dataclass
class _PlanInProgress:
    budget: int
    max_chunk: int  # prompt tokens of one request in this step at most
    scheduled: dict[str, ScheduledSeq] = field(default_factory=dict)
    preempted_ids: list[str] = field(default_factory=list)


class Scheduler:
    """Owns the request queues and the KV cache manager. The engine loop, one step at a time:

    plan = scheduler.schedule()
    output = runner.run(plan)  # StepOutput([]) when plan.scheduled is empty
    updates = scheduler.update(plan, output)  # always, once per schedule()
    events = scheduler.kv_cache.drain_events()  # publish the "full" ones to the router
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        layout = kv_cache.layout
        if layout.block_size != config.block_size:
            raise ValueError(f"block_size {config.block_size} != KV layout block_size {layout.block_size}")
        num_swa_needed = swa_blocks_per_seq(
            layout.window, layout.block_size, config.max_step_positions_per_seq
        )
        if layout.num_swa_blocks < num_swa_needed:
            raise ValueError(
                f"num_swa_blocks {layout.num_swa_blocks} < {num_swa_needed} one request's step needs"
            )
        self.config = config
        self.kv_cache = kv_cache
        self._requests: dict[str, RequestState] = {}  # unfinished requests
        self._waiting: list[RequestState] = []  # sorted by sort_key
        self._running: list[RequestState] = []
        self._num_arrivals = 0
        self._pending_updates: list[RequestUpdate] = []  # failures found outside update()
        self._finished_since_plan: list[str] = []
        self._in_flight_ids: set[str] = set()  # scheduled by the last plan, not yet updated
        self._deferred_abort_ids: set[str] = set()
        self.num_preemptions_total = 0  # for metrics and tests

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def running_ids(self) -> list[str]:
        return [state.request_id for state in self._running]

    def waiting_ids(self) -> list[str]:
        return [state.request_id for state in self._waiting]

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending_updates)

    def add(self, request: EngineRequest) -> None:
        """Queue a request; one that can never fit is failed and reported by the next `update`."""
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already queued")
        state = RequestState(request, self._num_arrivals, list(request.prompt_token_ids))
        self._num_arrivals += 1
        self._requests[request.request_id] = state
        num_prompt = len(request.prompt_token_ids)
        num_blocks = -(-(num_prompt + self.config.num_lookahead_tokens) // self.config.block_size)
        if num_prompt >= self.config.max_model_len:
            self._fail(state, f"prompt of {num_prompt} tokens leaves no room in max_model_len")
        elif num_blocks > self.kv_cache.layout.num_full_blocks:
            self._fail(state, "prompt too long for the KV cache")
        else:
            bisect.insort(self._waiting, state, key=lambda s: s.sort_key)

    def abort(self, request_id: str) -> bool:
        """Finish a request with "abort" and free its blocks (after the step if it is in flight)."""
        state = self._requests.get(request_id)
        if state is None:
            return False
        if request_id in self._in_flight_ids:
            self._deferred_abort_ids.add(request_id)  # the runner may still be writing its KV
        else:
            self._finish(state, "abort")
        return True

    def drop_waiting(self, request_id: str) -> bool:
        """Finish a request that has never run (waiting, not preempted) with "error"; False if it
        has run or is gone. The caller reports why (the engine's queue-time bound)."""
        state = self._requests.get(request_id)
        if state is None or state.status is not RequestStatus.WAITING:
            return False
        self._finish(state, "error")
        return True

    def schedule(self) -> StepPlan:
        config = self.config
        running = sorted(self._running, key=lambda s: s.sort_key)
        decodes = [s for s in running if len(s.all_token_ids) - s.num_computed_tokens == 1]
        prefills = [s for s in running if len(s.all_token_ids) - s.num_computed_tokens > 1]
        if decodes:
            plan = _PlanInProgress(config.max_num_batched_tokens, config.max_prefill_chunk)
        else:  # no decode waits on this step: prefills may take the long chunk
            plan = _PlanInProgress(
                config.max_step_tokens, max(config.max_prefill_chunk, config.long_prefill_chunk)
            )
        for state in decodes + prefills:
            if plan.budget == 0:
                break
            if state.status is RequestStatus.RUNNING:  # not preempted earlier in this loop
                self._schedule_running(state, plan)
        if not plan.preempted_ids:  # admitting right after preempting would only thrash
            self._admit_waiting(plan)
        self._in_flight_ids = set(plan.scheduled)
        finished_ids, self._finished_since_plan = self._finished_since_plan, []
        return StepPlan(list(plan.scheduled.values()), plan.preempted_ids, finished_ids)

    def _schedule_running(self, state: RequestState, plan: _PlanInProgress) -> None:
        config = self.config
        num_pending = len(state.all_token_ids) - state.num_computed_tokens
        drafts: list[int] = []
        if num_pending == 1:
            max_drafts = min(config.num_lookahead_tokens, plan.budget - 1)
            max_drafts = min(max_drafts, config.max_model_len - len(state.all_token_ids) - 1)
            drafts = state.draft_token_ids[: max(0, max_drafts)]
            num_new = 1 + len(drafts)
        else:
            num_new = min(num_pending, plan.budget, plan.max_chunk)
        is_last = num_new - len(drafts) == num_pending
        num_lookahead = config.num_lookahead_tokens if is_last else 0
        while not self.kv_cache.allocate(state.request_id, state.num_computed_tokens, num_new, num_lookahead):
            victim = max(self._running, key=lambda s: s.sort_key)
            if victim is state and len(self._running) == 1:
                self._fail(state, "sequence too long for the KV cache")
                return
            victim_seq = plan.scheduled.pop(victim.request_id, None)
            if victim_seq is not None:
                plan.budget += len(victim_seq.token_ids)
            self._preempt(victim)
            plan.preempted_ids.append(victim.request_id)
            if victim is state:
                return
        self._add_to_plan(state, num_new, drafts, is_last, num_lookahead, num_pending > 1, plan)

    def _admit_waiting(self, plan: _PlanInProgress) -> None:
        config = self.config
        while self._waiting and plan.budget > 0 and len(self._running) < config.max_num_seqs:
            state = self._waiting[0]
            self._hash_new_blocks(state)
            num_hit = self.kv_cache.lookup(state.block_hashes, len(state.all_token_ids))
            num_pending = len(state.all_token_ids) - num_hit
            num_new = min(num_pending, plan.budget, plan.max_chunk)
            is_last = num_new == num_pending
            num_lookahead = config.num_lookahead_tokens if is_last else 0
            if not self.kv_cache.allocate(
                state.request_id, num_hit, num_new, num_lookahead, state.block_hashes
            ):
                if self._running:
                    break  # head of line waits for blocks; nothing behind it jumps ahead
                self._fail(state, "prompt too long for the KV cache")  # alone with every block free
                continue
            self._waiting.pop(0)
            state.status = RequestStatus.RUNNING
            state.num_computed_tokens = num_hit
            if not state.is_admitted_once:
                state.num_cached_tokens = min(num_hit, state.num_prompt_tokens)
                state.is_admitted_once = True
            self._running.append(state)
            self._add_to_plan(state, num_new, [], is_last, num_lookahead, True, plan)

    def _add_to_plan(
        self,
        state: RequestState,
        num_new: int,
        drafts: list[int],
        is_last: bool,
        num_lookahead: int,
        is_prefill: bool,
        plan: _PlanInProgress,
    ) -> None:
        start = state.num_computed_tokens
        token_ids = state.all_token_ids[start : start + num_new - len(drafts)] + drafts
        table_full, table_swa = self.kv_cache.block_tables(state.request_id)
        plan.scheduled[state.request_id] = ScheduledSeq(
            state.request_id,
            token_ids,
            start,
            table_full,
            table_swa,
            is_prefill,
            is_last,
            drafts,
            num_lookahead,
        )
        plan.budget -= num_new

    def update(self, plan: StepPlan, output: StepOutput) -> list[RequestUpdate]:
        """Apply the runner's output to the plan's requests; call once after every `schedule()`."""
        outputs = {seq_output.request_id: seq_output for seq_output in output.seqs}
        for seq in plan.scheduled:
            check_seq_output(seq, outputs.get(seq.request_id))
        updates, self._pending_updates = self._pending_updates, []
        for seq in plan.scheduled:
            state = self._requests.get(seq.request_id)
            if state is None or seq.request_id in self._deferred_abort_ids:
                continue
            update = self._apply(state, seq, outputs.get(seq.request_id))
            if update is not None:
                updates.append(update)
        self._end_step()
        return updates

    def fail_step(self, plan: StepPlan, message: str) -> list[RequestUpdate]:
        """The runner failed on `plan`: its requests end with "error"; call instead of `update`."""
        updates, self._pending_updates = self._pending_updates, []
        for seq in plan.scheduled:
            state = self._requests.get(seq.request_id)
            if state is None:
                continue
            self._finish(state, "error")
            updates.append(
                RequestUpdate(
                    seq.request_id,
                    [],
                    "error",
                    state.num_prompt_tokens,
                    state.num_cached_tokens,
                    None,
                    message,
                )
            )
        self._end_step()
        return updates

    def _end_step(self) -> None:
        """Aborts deferred while their step ran take effect; nothing is in flight any more."""
        for request_id in self._deferred_abort_ids:
            if request_id in self._requests:
                self._finish(self._requests[request_id], "abort")
        self._deferred_abort_ids.clear()
        self._in_flight_ids.clear()

    def token_ids(self, request_id: str) -> list[int]:
        """The request's committed tokens (prompt, then accepted outputs); read-only for callers."""
        return self._requests[request_id].all_token_ids

    def _apply(
        self, state: RequestState, seq: ScheduledSeq, seq_output: SeqOutput | None
    ) -> RequestUpdate | None:
        sampled = seq_output.sampled_token_ids if seq_output is not None and seq.is_last_chunk else []
        num_rejected = len(seq.draft_token_ids) - (len(sampled) - 1) if seq.is_last_chunk else 0
        state.num_computed_tokens += len(seq.token_ids) - num_rejected
        new_token_ids, finish_reason = self._append_tokens(state, sampled)
        state.num_computed_tokens = min(state.num_computed_tokens, len(state.all_token_ids))
        state.draft_token_ids = []
        if seq_output is not None and seq.is_last_chunk and finish_reason is None:
            state.draft_token_ids = list(seq_output.draft_token_ids)
        self._hash_new_blocks(state)
        self.kv_cache.commit(state.request_id, state.block_hashes, state.num_computed_tokens)
        if finish_reason is not None:
            self._finish(state, finish_reason)
        if not new_token_ids:
            return None
        extras = seq_output.extras if seq_output is not None else None
        return RequestUpdate(
            state.request_id,
            new_token_ids,
            finish_reason,
            state.num_prompt_tokens,
            state.num_cached_tokens,
            extras,
        )

    def _append_tokens(
        self, state: RequestState, sampled: list[int]
    ) -> tuple[list[int], FinishReason | None]:
        """Append sampled tokens up to the first finish condition (the rest are dropped)."""
        request = state.request
        for index, token_id in enumerate(sampled):
            state.all_token_ids.append(token_id)
            if token_id in request.stop_token_ids:
                return sampled[: index + 1], "stop"
            if len(state.all_token_ids) - state.num_prompt_tokens >= request.max_tokens:
                return sampled[: index + 1], "length"
            if len(state.all_token_ids) >= self.config.max_model_len:
                return sampled[: index + 1], "length"
        return list(sampled), None

    def _hash_new_blocks(self, state: RequestState) -> None:
        if self.kv_cache.enable_prefix_cache:
            salt = state.request.salt
            state.block_hashes += next_block_hashes(
                state.block_hashes, state.all_token_ids, self.config.block_size, salt
            )

    def _preempt(self, state: RequestState) -> None:
        """Free its blocks and requeue it at its original arrival; its outputs are recomputed."""
        self.kv_cache.free(state.request_id)
        self._running.remove(state)
        state.status = RequestStatus.PREEMPTED
        state.num_computed_tokens = 0
        state.num_preemptions += 1
        self.num_preemptions_total += 1
        state.draft_token_ids = []
        bisect.insort(self._waiting, state, key=lambda s: s.sort_key)

    def _fail(self, state: RequestState, message: str) -> None:
        self._finish(state, "error")
        update = RequestUpdate(
            state.request_id, [], "error", state.num_prompt_tokens, state.num_cached_tokens, None, message
        )
        self._pending_updates.append(update)

    def _finish(self, state: RequestState, reason: FinishReason) -> None:
        self.kv_cache.free(state.request_id)
        if state in self._running:
            self._running.remove(state)
        elif state in self._waiting:
            self._waiting.remove(state)
        state.status = RequestStatus.FINISHED
        state.finish_reason = reason
        del self._requests[state.request_id]
        self._finished_since_plan.append(state.request_id)
