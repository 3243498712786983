"""The engine against the plain full-recompute loop: batching, chunked prefill, prefix hits,
preemption and MTP drafts must never change a greedy output; bad requests fail alone."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.cli.main import EMBEDDED_MODEL
from mimo.config import MiMoConfig
from mimo.generate import SamplingParams as PlainParams
from mimo.generate import generate
from mimo.model import MiMoForCausalLM
from mimo.tokenizer import Tokenizer
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine, InvalidRequest
from replicas.engine.engine_config import EngineConfig
from tests.factory import random_config_dict, random_model

NEW_TOKENS = 10


@lru_cache(maxsize=1)
def _model() -> MiMoForCausalLM:
    return random_model(MiMoConfig.from_hub_dict(random_config_dict(max_position_embeddings=256)), seed=5)


@lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED_MODEL)


@lru_cache(maxsize=256)
def _reference(prompt: tuple[int, ...]) -> list[int]:
    return generate(_model(), list(prompt), PlainParams(max_new_tokens=NEW_TOKENS)).token_ids


def _greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _run(engine: Engine, prompts: list[list[int]], arrivals: list[int]) -> dict[str, list[int]]:
    """Adds request i at step arrivals[i]; returns every request's tokens."""
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    step = 0
    while pending or engine.has_work():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            engine.add(GenerateRequest(f"r{i}", prompts[i], _greedy()))
        for chunk in engine.step():
            assert chunk.error is None, chunk.error
            out[chunk.request_id] += chunk.token_ids
        step += 1
        assert step < 2000
    return out


prompt_sets = st.lists(st.lists(st.integers(3, 12), min_size=1, max_size=48), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompts=prompt_sets,
    shared=st.lists(st.integers(3, 300), min_size=0, max_size=40),
    arrivals=st.lists(st.integers(0, 6), min_size=5, max_size=5),
    block_size=st.sampled_from([2, 4, 8]),
    chunk=st.sampled_from([3, 8, 64]),
    max_num_seqs=st.integers(1, 4),
    kv_kib=st.sampled_from([1024, 2048, 8192]),
    drafts=st.integers(0, 3),
    max_draft_batch=st.sampled_from([None, 1, 2]),
)
def test_greedy_outputs_equal_plain_recompute(
    prompts: list[list[int]],
    shared: list[int],
    arrivals: list[int],
    block_size: int,
    chunk: int,
    max_num_seqs: int,
    kv_kib: int,
    drafts: int,
    max_draft_batch: int | None,
) -> None:
    """Catches any KV, scheduling or draft-verification bug that changes tokens: random prompt sets
    (a shared prefix on half of them), arrival orders, chunk and block sizes, budgets tight enough
    to preempt, MTP on and off (and switched off while the batch is larger than max_draft_batch)."""
    prompts = [(shared + p if i % 2 else p) for i, p in enumerate(prompts)]
    config = EngineConfig(
        block_size=block_size,
        kv_cache_bytes=kv_kib * 1024,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(chunk, max_num_seqs * (1 + drafts)),
        max_prefill_chunk=chunk,
        max_model_len=100,
        num_mtp_drafts=drafts,
        max_draft_batch=max_draft_batch,
    )
    engine = Engine(_model(), _tokenizer(), config)
    got = _run(engine, prompts, arrivals)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == _reference(tuple(p)), f"request {i}"
    assert engine.kv_cache.usage()["full"].num_used == 0
    engine.kv_cache.check_invariants()


def test_tight_budget_preempts_and_still_matches() -> None:
    """Catches preemption by recompute losing or duplicating tokens (the budget forces it)."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (40,), generator=gen).tolist() for _ in range(4)]
    config = EngineConfig(
        block_size=4, kv_cache_bytes=360 * 1024, max_num_seqs=4, max_num_batched_tokens=16,
        max_prefill_chunk=8, max_model_len=100, num_mtp_drafts=2,
    )  # fmt: skip
    engine = Engine(_model(), _tokenizer(), config)
    assert engine.kv_cache.layout.num_swa_blocks < 2 * 9  # under two sequences' windows and steps
    got = _run(engine, prompts, [0, 0, 0, 0])
    assert engine.scheduler.num_preemptions_total > 0
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == _reference(tuple(p))


def test_drafting_pauses_while_the_batch_is_large_and_resumes() -> None:
    """Catches a draft cut-off that never drafts, never pauses, or changes tokens when a sequence
    resumes drafting over MTP KV it skipped: request 0 runs alone (drafts), then with two more
    (no drafts above max_draft_batch=1), then alone again once they finish (drafts again)."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (12,), generator=gen).tolist() for _ in range(3)]
    config = EngineConfig(block_size=4, max_model_len=100, num_mtp_drafts=2, max_draft_batch=1)
    engine = Engine(_model(), _tokenizer(), config)
    engine.add(GenerateRequest("long", prompts[0], _greedy(40)))
    out: dict[str, list[int]] = {"long": [], "a": [], "b": []}
    # sequences verifying drafts in a step, by how many sequences sampled in the step that drafted
    verified_by_crowd: dict[int, int] = {}
    num_sampled_before = 0
    for step in range(200):
        if step == 3:
            engine.add(GenerateRequest("a", prompts[1], _greedy(6)))
            engine.add(GenerateRequest("b", prompts[2], _greedy(6)))
        before = engine.stats["drafts"]
        chunks = engine.step()
        for chunk in chunks:
            assert chunk.error is None, chunk.error
            out[chunk.request_id] += chunk.token_ids
        verified = engine.stats["drafts"] - before
        verified_by_crowd[num_sampled_before] = verified_by_crowd.get(num_sampled_before, 0) + verified
        num_sampled_before = len({c.request_id for c in chunks if c.token_ids})
        if not engine.has_work():
            break
    reference = generate(_model(), prompts[0], PlainParams(max_new_tokens=40)).token_ids
    assert out["long"] == reference
    for rid, prompt in (("a", prompts[1]), ("b", prompts[2])):
        assert out[rid] == generate(_model(), prompt, PlainParams(max_new_tokens=6)).token_ids
    assert set(verified_by_crowd) >= {1, 3}  # the long request sampled alone and in a crowd
    assert verified_by_crowd[1] > 0
    assert all(n == 0 for crowd, n in verified_by_crowd.items() if crowd > 1)


def test_prefix_hit_leaving_one_token_with_three_drafts() -> None:
    """Catches MTP blocks 2+ reaching for a hidden state from before the slot their state starts at:
    a prefix hit that leaves one token to compute starts drafting like a decode (it used to fail
    the request with 3 drafts)."""
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 300, (21,), generator=gen).tolist()  # 20 cached, 1 to compute
    engine = Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=100, num_mtp_drafts=3))
    engine.generate([GenerateRequest("a", prompt, _greedy())])
    chunks = engine.generate([GenerateRequest("b", prompt, _greedy())])["b"]
    assert [c.error for c in chunks if c.error] == []
    assert chunks[-1].usage is not None and chunks[-1].usage.cached_tokens == 20
    assert [t for c in chunks for t in c.token_ids] == _reference(tuple(prompt))


def test_repeated_prefix_reports_cached_tokens() -> None:
    """Catches prefix hits that are not reported in usage (or not taken at all)."""
    engine = Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200))
    prompt = list(range(3, 103))
    first = engine.generate([GenerateRequest("a", prompt, _greedy())])["a"][-1].usage
    second = engine.generate([GenerateRequest("b", [*prompt[:-1], 7], _greedy())])["b"][-1].usage
    third = engine.generate([GenerateRequest("c", prompt, _greedy(), salt="tenant-2")])["c"][-1].usage
    assert first is not None and second is not None and third is not None
    assert (first.cached_tokens, second.cached_tokens, third.cached_tokens) == (0, 96, 0)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], _greedy(), "prompt"),
        (list(range(300)), _greedy(), "prompt"),
        ([5, 999_999], _greedy(), "prompt"),
        ([5], SamplingParams(max_tokens=0), "max_tokens"),
        ([5], SamplingParams(temperature=-1.0), "temperature"),
        ([5], SamplingParams(top_p=1.5), "top_p"),
    ],
)
def test_bad_requests_name_the_field(prompt: list[int], params: SamplingParams, field: str) -> None:
    """Catches invalid input being accepted, or rejected without saying which parameter."""
    engine = Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200))
    with pytest.raises(InvalidRequest) as info:
        engine.add(GenerateRequest("x", prompt, params))
    assert info.value.field == field


def test_failed_step_ends_its_requests_and_engine_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches one broken forward pass killing the replica instead of failing that step's requests."""
    engine = Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200))
    engine.add(GenerateRequest("doomed", [5, 6, 7], _greedy()))
    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    chunks = engine.step()
    assert [(c.request_id, c.finish_reason) for c in chunks] == [("doomed", "error")]
    assert chunks[0].error is not None and "boom" in chunks[0].error
    monkeypatch.setattr(engine.runner, "execute", real)
    out = engine.generate([GenerateRequest("fine", [5, 6, 7], _greedy())])
    assert [t for c in out["fine"] for t in c.token_ids] == _reference((5, 6, 7))


def test_a_step_failed_by_the_expert_path_is_retriable_and_a_bug_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches lost expert shards reported as a permanent failure (clients would not retry), or a
    bug in the forward reported as transient (clients would retry it forever)."""
    from replicas.experts.dispatch import ExpertsUnavailable

    for error, retriable in ((ExpertsUnavailable("shard gone"), True), (RuntimeError("boom"), False)):
        engine = Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200))
        engine.add(GenerateRequest("r", [5, 6, 7], _greedy()))
        monkeypatch.setattr(engine.runner, "execute", lambda *a, e=error: (_ for _ in ()).throw(e))
        [chunk] = engine.step()
        assert chunk.finish_reason == "error" and (chunk.retry_after_s is not None) == retriable


def test_a_request_not_started_within_max_queue_wait_is_refused_retriably() -> None:
    """Catches the queue-time bound cutting a request that already started (running or
    preempted), counting from the replica instead of the API arrival, or ending it silently."""
    import time

    from replicas.engine.engine import QUEUE_RETRY_AFTER_S

    config = EngineConfig(block_size=4, max_model_len=200, max_num_seqs=1, max_queue_wait_s=0.5)
    engine = Engine(_model(), _tokenizer(), config)
    engine.add(GenerateRequest("runs", [5, 6, 7], _greedy()))
    stale = GenerateRequest("stale", [8, 9], _greedy(), arrival_s=time.time() - 2.0)
    engine.add(stale)  # reached the API 2 s ago: past the bound before its first step here
    engine.add(GenerateRequest("waits", [5, 6, 7, 8], _greedy()))  # queued behind "runs", in time
    first = engine.step()
    [refused] = [c for c in first if c.request_id == "stale"]
    assert refused.finish_reason == "error" and refused.retry_after_s == QUEUE_RETRY_AFTER_S
    assert refused.error is not None and "max_queue_wait_s" in refused.error
    assert refused.usage is not None and refused.usage.queue_s >= 2.0
    assert engine.stats["queue_expired"] == 1
    assert "stale" not in engine.scheduler.waiting_ids()
    out: dict[str, list[int]] = {"runs": [], "waits": []}
    for c in first:
        if c.request_id != "stale":
            out[c.request_id] += c.token_ids
    while engine.has_work():
        for c in engine.step():
            assert c.error is None, c.error
            out[c.request_id] += c.token_ids
    assert out == {"runs": _reference((5, 6, 7)), "waits": _reference((5, 6, 7, 8))}

    # once started, a request is never cut, however long it then waits (here: preempted)
    engine = Engine(_model(), _tokenizer(), config)
    engine.add(GenerateRequest("started", [5, 6, 7], _greedy()))
    tokens = [t for c in engine.step() for t in c.token_ids]
    engine.scheduler._preempt(engine.scheduler._running[0])  # waiting again, as under KV pressure
    engine._live["started"].added_s -= 10.0  # and long past the bound
    while engine.has_work():
        for c in engine.step():
            assert c.error is None, c.error
            tokens += c.token_ids
    assert engine.stats["queue_expired"] == 0 and tokens == _reference((5, 6, 7))


def test_only_the_replicas_own_step_failures_count_toward_its_health(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches a good step not clearing the failure run (a recovered replica replaced anyway), or
    lost expert shards counted against the attention replica (the whole group replaced)."""
    from replicas.experts.dispatch import ExpertsUnavailable

    engine = Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200))
    real = engine.runner.execute
    for k, error in enumerate([RuntimeError("boom"), RuntimeError("boom"), ExpertsUnavailable("gone")]):
        engine.add(GenerateRequest(f"r{k}", [5, 6, 7], _greedy()))
        monkeypatch.setattr(engine.runner, "execute", lambda *a, e=error: (_ for _ in ()).throw(e))
        engine.step()
    assert engine.failures.num_steps == 2 and "boom" in engine.failures.last_error
    monkeypatch.setattr(engine.runner, "execute", real)
    engine.generate([GenerateRequest("fine", [5, 6, 7], _greedy())])
    assert engine.failures.num_steps == 0


def test_stop_strings_wait_for_min_tokens() -> None:
    """Catches a stop string ending a request before min_tokens tokens were generated."""
    engine = Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200))
    free = engine.generate([GenerateRequest("free", [5, 6, 7], _greedy())])["free"]
    text = "".join(c.text for c in free)
    stop = text[1:3]
    assert stop and text.find(stop) < len(text) // 2
    stopped = engine.generate(
        [
            GenerateRequest(
                "s", [5, 6, 7], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop=(stop,))
            )
        ]
    )["s"]
    assert stopped[-1].finish_reason == "stop" and sum(len(c.token_ids) for c in stopped) < NEW_TOKENS
    waited = engine.generate(
        [
            GenerateRequest(
                "w",
                [5, 6, 7],
                SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop=(stop,), min_tokens=6),
            )
        ]
    )["w"]
    assert sum(len(c.token_ids) for c in waited) >= 6
