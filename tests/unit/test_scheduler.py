"""Scheduler: chunking, budgets, prefix hits, preemption, MTP drafts, finishing; and a fake runner
that emulates the paged KV so random runs prove outputs equal a plain full-recompute decode."""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from replicas.engine.kv_cache import KVCacheManager
from replicas.engine.kv_layout import KVLayout, swa_blocks_per_seq
from replicas.engine.requests import (
    EngineRequest,
    RequestUpdate,
    ScheduledSeq,
    SeqOutput,
    StepOutput,
    StepPlan,
)
from replicas.engine.scheduler import Scheduler, SchedulerConfig

STOP = 5
WRONG_DRAFT = 1


def script(seed: int, length: int) -> list[int]:
    """The tokens a greedy full-recompute model would generate for request `seed` (10..89)."""
    return [10 + (seed * 7919 + i * 104_729) % 80 for i in range(length)]


class FakeRunner:
    """Greedy model whose "KV" at position p is the exact token prefix [0..p] of the sequence.

    Before computing a step it checks every key its queries read: GA keys [0, start) and SWA keys
    [start - window, start) must hold the true prefix, through the block tables it was given.
    It writes only uncached blocks, fills lookahead slots with junk (MTP drafts), verifies drafts
    against the true continuation and proposes drafts that are wrong at some positions.
    """

    def __init__(self, kv: KVCacheManager, truths: dict[str, list[int]], num_drafts: int) -> None:
        self.kv = kv
        self.truths = truths
        self.num_drafts = num_drafts
        self.full_kv: dict[tuple[int, int], object] = {}
        self.swa_kv: dict[tuple[int, int], object] = {}

    def run(self, plan: StepPlan) -> StepOutput:
        return StepOutput([self._run_seq(seq) for seq in plan.scheduled])

    def _slot(self, table: list[int] | list[int | None], position: int) -> tuple[int, int]:
        block = table[position // self.kv.layout.block_size]
        assert block is not None, f"position {position} has no SWA block"
        return block, position % self.kv.layout.block_size

    def _run_seq(self, seq: ScheduledSeq) -> SeqOutput:
        truth, start, window = self.truths[seq.request_id], seq.start_position, self.kv.layout.window
        num_drafts = len(seq.draft_token_ids)
        num_real = len(seq.token_ids) - num_drafts
        assert seq.token_ids[:num_real] == truth[start : start + num_real], "fed wrong tokens"
        assert seq.token_ids[num_real:] == seq.draft_token_ids
        for key in range(start):
            assert self.full_kv.get(self._slot(seq.block_table_full, key)) == tuple(truth[: key + 1])
        for key in range(max(0, start - window), start):
            assert self.swa_kv.get(self._slot(seq.block_table_swa, key)) == tuple(truth[: key + 1])
        fed = truth[:start] + seq.token_ids
        for position in range(start, start + len(seq.token_ids) + seq.num_lookahead_slots):
            content = tuple(fed[: position + 1]) if position < len(fed) else ("mtp", position)
            for table, store, pool in (
                (seq.block_table_full, self.full_kv, self.kv.full_pool),
                (seq.block_table_swa, self.swa_kv, self.kv.swa_pool),
            ):
                slot = self._slot(table, position)
                assert pool.block_hash(slot[0]) is None, "wrote into a cached (shareable) block"
                store[slot] = content
        if not seq.is_last_chunk:
            return SeqOutput(seq.request_id, [])
        first_draft = start + num_real
        num_accepted = 0
        while (
            num_accepted < num_drafts
            and seq.draft_token_ids[num_accepted] == truth[first_draft + num_accepted]
        ):
            num_accepted += 1
        sampled = [*seq.draft_token_ids[:num_accepted], truth[first_draft + num_accepted]]
        next_position = first_draft + num_accepted + 1
        drafts = [
            truth[p] if p % 3 != 1 else WRONG_DRAFT
            for p in range(next_position, next_position + self.num_drafts)
        ]
        return SeqOutput(seq.request_id, sampled, drafts, extras=("logprobs", seq.request_id))


def make(
    *,
    num_full: int = 16,
    num_swa: int = 16,
    window: int = 4,
    block_size: int = 4,
    max_num_seqs: int = 4,
    budget: int = 16,
    chunk: int = 8,
    max_model_len: int = 64,
    lookahead: int = 0,
    long_chunk: int = 0,
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, budget, chunk, block_size, max_model_len, lookahead, long_chunk)
    return Scheduler(config, KVCacheManager(KVLayout(block_size, num_full, num_swa, window)))


def request(
    request_id: str, prompt: list[int], max_tokens: int = 4, priority: int = 0, salt: str | None = None
) -> EngineRequest:
    return EngineRequest(request_id, tuple(prompt), max_tokens, frozenset({STOP}), priority, salt)


def step(
    scheduler: Scheduler, runner: FakeRunner, updates: dict[str, list[RequestUpdate]] | None = None
) -> StepPlan:
    plan = scheduler.schedule()
    for update in scheduler.update(plan, runner.run(plan)):
        if updates is not None:
            updates.setdefault(update.request_id, []).append(update)
    scheduler.kv_cache.check_invariants()
    return plan


def truth_of(prompt: list[int], seed: int) -> list[int]:
    return prompt + script(seed, 64)


def outputs(updates: list[RequestUpdate]) -> list[int]:
    return [token for update in updates for token in update.new_token_ids]


def test_chunked_prefill_chunk_sizes_and_last_chunk() -> None:
    """Catches chunks past max_prefill_chunk, sampling after a non-last chunk, or lost positions."""
    scheduler = make(budget=8, chunk=6)
    prompt = list(range(20, 35))  # 15 tokens
    scheduler.add(request("a", prompt, max_tokens=2))
    runner = FakeRunner(scheduler.kv_cache, {"a": truth_of(prompt, 0)}, 0)
    plans = [step(scheduler, runner) for _ in range(4)]
    shapes = [
        [(s.start_position, len(s.token_ids), s.is_prefill_chunk, s.is_last_chunk) for s in p.scheduled]
        for p in plans
    ]
    assert shapes == [
        [(0, 6, True, False)],
        [(6, 6, True, False)],
        [(12, 3, True, True)],
        [(15, 1, False, True)],
    ]
    assert not scheduler.has_unfinished()


def test_decodes_first_then_prefills_then_admission_within_budget() -> None:
    """Catches a long prompt eating the budget of running decodes, or admission past the budget."""
    scheduler = make(budget=8, chunk=8)
    truths = {rid: truth_of([30 + i] * 4, i) for i, rid in enumerate(["a", "b", "c", "d"])}
    runner = FakeRunner(scheduler.kv_cache, truths, 0)
    scheduler.add(request("a", truths["a"][:4], max_tokens=10))
    scheduler.add(request("b", truths["b"][:4], max_tokens=10))
    step(scheduler, runner)  # a and b: 4 + 4 prompt tokens
    long_prompt = [40] * 20
    truths["c"] = truth_of(long_prompt, 2)
    scheduler.add(request("c", long_prompt, max_tokens=3))
    scheduler.add(request("d", truths["d"][:4]))
    plan = step(scheduler, runner)
    assert [(s.request_id, len(s.token_ids)) for s in plan.scheduled] == [("a", 1), ("b", 1), ("c", 6)]
    plan = step(scheduler, runner)  # running prefill c before admitting d
    assert [(s.request_id, len(s.token_ids)) for s in plan.scheduled] == [("a", 1), ("b", 1), ("c", 6)]
    assert scheduler.waiting_ids() == ["d"]


def test_long_prefill_chunk_only_in_steps_without_decodes() -> None:
    """Catches a long chunk taken while a decode runs (that decode would wait one long step per
    token) or never taken when none does: alone, a 30-token prompt runs in chunks of 12 (the long
    chunk, over the budget of 8); once a decode runs, the next prompt's chunks fall back to 4 and
    the decode is served every step; when it finishes, the chunks grow again."""
    scheduler = make(budget=8, chunk=4, long_chunk=12, num_full=32, num_swa=16, max_model_len=128)
    truths = {"a": truth_of([30] * 30, 0), "b": truth_of([40] * 30, 1)}
    runner = FakeRunner(scheduler.kv_cache, truths, 0)
    scheduler.add(request("a", truths["a"][:30], max_tokens=4))
    shapes: list[list[tuple[str, int]]] = []
    for _ in range(12):
        if len(shapes) == 3:
            scheduler.add(request("b", truths["b"][:30], max_tokens=2))
        plan = step(scheduler, runner)
        shapes.append([(s.request_id, len(s.token_ids)) for s in plan.scheduled])
    assert shapes == [
        [("a", 12)],
        [("a", 12)],
        [("a", 6)],
        [("a", 1), ("b", 4)],  # a decodes: b's first chunk is short
        [("a", 1), ("b", 4)],
        [("a", 1), ("b", 4)],  # a's 4th token ends it
        [("b", 12)],
        [("b", 6)],
        [("b", 1)],
        [],
        [],
        [],
    ]


def test_prefix_hit_skips_tokens_and_reports_cached_count() -> None:
    """Catches a hit that is not used, not reported in usage, or starts at the wrong position."""
    scheduler = make(window=4, chunk=16)
    prompt = list(range(50, 62))  # 12 tokens
    truths = {"a": truth_of(prompt, 1), "b": truth_of([*prompt, 7, 8, 9], 2)}
    runner = FakeRunner(scheduler.kv_cache, truths, 0)
    scheduler.add(request("a", prompt, max_tokens=1))
    updates: dict[str, list[RequestUpdate]] = {}
    step(scheduler, runner, updates)
    assert updates["a"][0].num_cached_tokens == 0
    scheduler.add(request("b", [*prompt, 7, 8, 9], max_tokens=1))
    plan = step(scheduler, runner, updates)
    assert [(s.start_position, s.token_ids) for s in plan.scheduled] == [(12, [7, 8, 9])]
    assert updates["b"] == [RequestUpdate("b", truths["b"][15:16], "length", 15, 12, ("logprobs", "b"))]


def test_tenant_salt_prevents_hits() -> None:
    """Catches a prefix hit across tenants (leaks one tenant's cached context timing to another)."""
    scheduler = make(chunk=16)
    prompt = list(range(50, 62))
    runner = FakeRunner(scheduler.kv_cache, {"a": truth_of(prompt, 1), "b": truth_of(prompt, 1)}, 0)
    scheduler.add(request("a", prompt, max_tokens=1, salt="t1"))
    step(scheduler, runner)
    scheduler.add(request("b", prompt, max_tokens=1, salt="t2"))
    assert step(scheduler, runner).scheduled[0].start_position == 0


def test_preemption_picks_latest_lowest_priority_and_requeues_it_first() -> None:
    """Catches preempting the wrong request, starving it at the back of the queue, or losing outputs."""
    scheduler = make(num_full=5, num_swa=16, max_num_seqs=3, budget=16, chunk=8)
    truths = {rid: truth_of([60 + i] * 3, i) for i, rid in enumerate(["a", "b", "c"])}
    runner = FakeRunner(scheduler.kv_cache, truths, 0)
    scheduler.add(request("a", truths["a"][:3], max_tokens=10))
    scheduler.add(request("b", truths["b"][:3], max_tokens=10, priority=-1))
    scheduler.add(request("c", truths["c"][:3], max_tokens=10))
    updates: dict[str, list[RequestUpdate]] = {}
    preempted = []
    for index in range(1, 8):  # prefill 0..2, then one decode position per step
        preempted += [(index, rid) for rid in step(scheduler, runner, updates).preempted_ids]
    # step 3 (position 4): b, a take the last 2 blocks and c, the latest, preempts itself;
    # step 7 (position 8): b (priority -1) takes c's freed block and a is the latest running
    assert preempted == [(3, "c"), (7, "a")]
    assert scheduler.waiting_ids() == ["a", "c"]  # a arrived before c, so it goes first
    while scheduler.has_unfinished():
        step(scheduler, runner, updates)
    for rid in "abc":
        assert outputs(updates[rid]) == truths[rid][3:13]


def test_request_that_alone_cannot_fit_fails_instead_of_looping() -> None:
    """Catches a deadlock (or endless self-preemption) when a sequence outgrows the whole pool."""
    scheduler = make(num_full=3, max_model_len=100)
    prompt = list(range(8))
    scheduler.add(request("a", prompt, max_tokens=20))
    scheduler.add(request("huge", list(range(13))))
    runner = FakeRunner(scheduler.kv_cache, {"a": truth_of(prompt, 3)}, 0)
    updates: dict[str, list[RequestUpdate]] = {}
    for _ in range(10):
        step(scheduler, runner, updates)
    assert updates["huge"] == [
        RequestUpdate("huge", [], "error", 13, 0, None, "prompt too long for the KV cache")
    ]
    assert outputs(updates["a"]) == truth_of(prompt, 3)[8:13]  # positions 8..11 fit in 3 blocks
    assert (
        updates["a"][-1].finish_reason == "error"
        and updates["a"][-1].error == "sequence too long for the KV cache"
    )
    assert not scheduler.has_unfinished()
    assert scheduler.kv_cache.usage()["full"].num_used == 0


def test_mtp_drafts_fed_verified_and_rejected_slots_recomputed() -> None:
    """Catches counting rejected drafts as computed KV, or not feeding drafts with their slots."""
    scheduler = make(lookahead=2, window=4)
    prompt = [70, 71, 72]
    truth = truth_of(prompt, 4)
    runner = FakeRunner(scheduler.kv_cache, {"a": truth}, 2)
    scheduler.add(request("a", prompt, max_tokens=8))
    updates: dict[str, list[RequestUpdate]] = {}
    first = step(scheduler, runner, updates)
    assert first.scheduled[0].num_lookahead_slots == 2
    second = step(scheduler, runner, updates)
    # drafts for positions 4, 5: position 4 % 3 == 1 so the first draft is wrong and rejected
    assert second.scheduled[0].token_ids == [truth[3], WRONG_DRAFT, truth[5]]
    assert second.scheduled[0].start_position == 3
    third = step(scheduler, runner, updates)
    assert third.scheduled[0].start_position == 4  # only truth[3] became final
    assert third.scheduled[0].token_ids == truth[4:7]  # both new drafts right: 3 tokens sampled
    assert outputs(updates["a"]) == truth[3:8]
    while scheduler.has_unfinished():
        step(scheduler, runner, updates)
    assert outputs(updates["a"]) == truth[3:11]


def test_stop_token_and_max_tokens_truncate_accepted_drafts() -> None:
    """Catches tokens streamed after a stop token or past max_tokens when MTP accepts several."""
    for stop_at, max_tokens, expected_reason in ((1, 8, "stop"), (5, 2, "length")):
        scheduler = make(lookahead=3)
        prompt = [80, 81]
        generated = script(6, 20)
        generated[stop_at] = STOP
        truth = prompt + generated
        runner = FakeRunner(scheduler.kv_cache, {"a": truth}, 3)
        runner.num_drafts = 3
        scheduler.add(request("a", prompt, max_tokens=max_tokens))
        updates: dict[str, list[RequestUpdate]] = {}
        while scheduler.has_unfinished():
            step(scheduler, runner, updates)
        assert outputs(updates["a"]) == generated[: min(stop_at + 1, max_tokens)]
        assert updates["a"][-1].finish_reason == expected_reason
        assert scheduler.kv_cache.usage()["full"].num_used == 0


def test_max_model_len_finishes_with_length() -> None:
    """Catches generation past max_model_len, and prompts that leave no room being accepted."""
    scheduler = make(max_model_len=10)
    prompt = list(range(7))
    runner = FakeRunner(scheduler.kv_cache, {"a": truth_of(prompt, 7)}, 0)
    scheduler.add(request("a", prompt, max_tokens=50))
    scheduler.add(request("b", list(range(10))))
    updates: dict[str, list[RequestUpdate]] = {}
    while scheduler.has_unfinished():
        step(scheduler, runner, updates)
    assert len(outputs(updates["a"])) == 3 and updates["a"][-1].finish_reason == "length"
    assert updates["b"][0].finish_reason == "error"


def test_abort_waiting_running_and_in_flight() -> None:
    """Catches leaked blocks on abort, or blocks freed while the runner still writes them."""
    scheduler = make(max_num_seqs=1)
    truths = {"a": truth_of([1, 2, 3], 8), "b": truth_of([4, 5, 6], 9)}
    runner = FakeRunner(scheduler.kv_cache, truths, 0)
    scheduler.add(request("a", [1, 2, 3], max_tokens=10))
    scheduler.add(request("b", [4, 5, 6], max_tokens=10))
    step(scheduler, runner)
    assert scheduler.abort("b") and scheduler.waiting_ids() == []
    plan = scheduler.schedule()
    assert plan.finished_ids == ["b"]
    assert scheduler.abort("a")
    assert scheduler.kv_cache.usage()["full"].num_used == 1  # still in flight
    assert scheduler.update(plan, runner.run(plan)) == []
    assert scheduler.kv_cache.usage()["full"].num_used == 0
    assert not scheduler.abort("a") and not scheduler.has_unfinished()
    assert scheduler.schedule().finished_ids == ["a"]


def test_priority_then_arrival_orders_admission() -> None:
    """Catches admission in plain arrival order ignoring priority, or unstable ties."""
    scheduler = make(max_num_seqs=1)
    for rid, priority in (("a", 1), ("b", 0), ("c", 1), ("d", 0)):
        scheduler.add(request(rid, [9, 9], priority=priority))
    assert scheduler.waiting_ids() == ["b", "d", "a", "c"]


def test_missing_or_inconsistent_runner_output_is_rejected() -> None:
    """Catches silently advancing a request the runner never sampled, or accepting non-draft tokens."""
    scheduler = make(lookahead=1)
    scheduler.add(request("a", [1, 2, 3]))
    plan = scheduler.schedule()
    with pytest.raises(ValueError, match="no output"):
        scheduler.update(plan, StepOutput([]))
    with pytest.raises(ValueError, match="tokens for 0 drafts"):
        scheduler.update(plan, StepOutput([SeqOutput("a", [11, 12])]))


def test_config_and_layout_mismatch_raise() -> None:
    """Catches a scheduler built over a KV layout it cannot run a single request on."""
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(SchedulerConfig(1, 8, 8, 4, 64), KVCacheManager(KVLayout(8, 8, 8, 4)))
    with pytest.raises(ValueError, match="num_swa_blocks"):
        Scheduler(SchedulerConfig(1, 8, 8, 4, 64), KVCacheManager(KVLayout(4, 8, 2, 4)))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(4, 2, 8, 4, 64)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    block_size = draw(st.sampled_from([2, 4]))
    window = draw(st.sampled_from([0, 3, 4, 8]))
    lookahead = draw(st.integers(0, 2))
    max_num_seqs = draw(st.integers(1, 4))
    budget = draw(st.integers(max(max_num_seqs, 1 + lookahead), 12))
    chunk = draw(st.integers(1, 10))
    long_chunk = draw(st.sampled_from([0, 0, chunk + 1, 16]))
    max_model_len = draw(st.integers(8, 40))
    config = SchedulerConfig(max_num_seqs, budget, chunk, block_size, max_model_len, lookahead, long_chunk)
    num_full = -(-(max_model_len + lookahead) // block_size) + draw(st.integers(0, 6))
    num_swa = swa_blocks_per_seq(window, block_size, config.max_step_positions_per_seq) + draw(
        st.integers(0, 4)
    )
    bases = [[20 + i for i in range(10)], [40 + i for i in range(10)]]
    requests = []
    for index in range(draw(st.integers(1, 9))):
        prompt = bases[draw(st.integers(0, 1))][: draw(st.integers(0, 10))] + draw(
            st.lists(st.integers(10, 89), max_size=12)
        )
        prompt = prompt or [11]
        prompt = prompt[: max_model_len - 1]
        generated = script(index, 60)
        if draw(st.booleans()):
            generated[draw(st.integers(0, 10))] = STOP
        arrive_at = draw(st.integers(0, 6))
        abort_at = draw(st.one_of(st.none(), st.integers(0, 20)))
        salt = draw(st.sampled_from([None, "t"]))
        max_tokens = draw(st.integers(1, 12))
        priority = draw(st.integers(0, 1))
        requests.append((f"r{index}", prompt, generated, max_tokens, priority, salt, arrive_at, abort_at))
    return {"config": config, "layout": KVLayout(block_size, num_full, num_swa, window), "requests": requests}


@settings(max_examples=200, deadline=None)
@given(scenario=scenarios())
def test_random_runs_match_full_recompute(scenario: dict[str, object]) -> None:
    """Catches any bookkeeping bug under preemption, chunking, prefix hits, drafts and aborts: every
    request must end with exactly its scripted tokens, in bounded steps, with all blocks freed."""
    config = scenario["config"]
    layout = scenario["layout"]
    assert isinstance(config, SchedulerConfig) and isinstance(layout, KVLayout)
    requests = scenario["requests"]
    assert isinstance(requests, list)
    kv = KVCacheManager(layout)
    scheduler = Scheduler(config, kv)
    truths = {rid: prompt + generated for rid, prompt, generated, *_ in requests}
    runner = FakeRunner(kv, truths, config.num_lookahead_tokens)
    updates: dict[str, list[RequestUpdate]] = {}
    swa_bound = swa_blocks_per_seq(layout.window, layout.block_size, config.max_step_positions_per_seq)
    num_steps = 0
    while num_steps <= 6 or scheduler.has_unfinished():  # arrivals run to step 6
        for rid, prompt, _, max_tokens, priority, salt, arrive_at, abort_at in requests:
            if arrive_at == num_steps:
                scheduler.add(
                    EngineRequest(rid, tuple(prompt), max_tokens, frozenset({STOP}), priority, salt)
                )
            if abort_at == num_steps and arrive_at <= num_steps and abort_at % 2 == 0:
                scheduler.abort(rid)
        plan = scheduler.schedule()
        for rid, _, _, _, _, _, arrive_at, abort_at in requests:
            if abort_at == num_steps and arrive_at <= num_steps and abort_at % 2 == 1:
                scheduler.abort(rid)  # while the step is in flight
        if plan.preempted_ids:
            event("preempted")
        for seq in plan.scheduled:
            if seq.draft_token_ids:
                event("drafts fed")
            assert sum(b is not None for b in seq.block_table_swa) <= swa_bound
        assert plan.num_scheduled_tokens <= config.max_step_tokens
        if any(not seq.is_prefill_chunk for seq in plan.scheduled):  # a decode: the short budget
            assert plan.num_scheduled_tokens <= config.max_num_batched_tokens
            assert all(
                len(s.token_ids) <= config.max_prefill_chunk for s in plan.scheduled if s.is_prefill_chunk
            )
        assert len(scheduler.running_ids()) <= config.max_num_seqs
        for update in scheduler.update(plan, runner.run(plan)):
            updates.setdefault(update.request_id, []).append(update)
            if update.num_cached_tokens:
                event("prefix hit")
        kv.check_invariants()
        num_steps += 1
        assert num_steps < 400, "no progress: starvation or livelock"
    for rid, prompt, generated, max_tokens, _, _, _, abort_at in requests:
        got = outputs(updates.get(rid, []))
        limit = min(max_tokens, config.max_model_len - len(prompt))
        expected = generated[:limit]
        if STOP in expected:
            expected = expected[: expected.index(STOP) + 1]
        reasons = [u.finish_reason for u in updates.get(rid, []) if u.finish_reason is not None]
        if abort_at is None:
            assert got == expected and len(reasons) == 1 and reasons[0] in ("stop", "length")
        else:
            assert got == expected[: len(got)] and len(reasons) <= 1
    usage = kv.usage()
    assert usage["full"].num_used == 0 and usage["swa"].num_used == 0


def test_drop_waiting_takes_only_requests_that_never_ran() -> None:
    """Catches the queue-time bound dropping a running or preempted request (its client has
    tokens already) or leaving a dropped one queued."""
    scheduler = make(num_full=5, num_swa=16, max_num_seqs=1, budget=16, chunk=8)
    scheduler.add(request("queued", [70, 71, 72], max_tokens=10))
    scheduler.add(request("preempted", [80, 81, 82], max_tokens=10, priority=-1))
    plan = scheduler.schedule()  # "preempted" (priority -1) runs first
    assert [s.request_id for s in plan.scheduled] == ["preempted"]
    scheduler.update(plan, StepOutput([SeqOutput("preempted", [90])]))
    scheduler._preempt(scheduler._running[0])
    assert not scheduler.drop_waiting("preempted")
    plan = scheduler.schedule()
    scheduler.update(plan, StepOutput([SeqOutput(s.request_id, [91]) for s in plan.scheduled]))
    assert not scheduler.drop_waiting("preempted")  # running again
    assert scheduler.drop_waiting("queued") and not scheduler.drop_waiting("queued")
    assert "queued" not in scheduler.waiting_ids()
    assert "queued" in scheduler.schedule().finished_ids
