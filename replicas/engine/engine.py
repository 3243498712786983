"""The attention-replica engine: requests in, token chunks out, one scheduler step at a time.

`Engine` is synchronous and single-threaded (schedule -> run -> update -> detokenize -> stop
strings); `replicas/engine/async_engine.py` drives it from a background thread for the serving layer, and
`generate` runs a batch offline for benchmarks. Bad requests are rejected at `add` with the field
at fault; a failure while serving one request ends that request with an error, never the others.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from mimo.model import MiMoForCausalLM
from mimo.tokenizer import IncrementalDetokenizer, Tokenizer
from protocol.messages import Chunk, GenerateRequest, TokenLogprobs, Usage
from protocol.sampling import InvalidSamplingParameter
from replicas.engine.engine_config import EngineConfig, build_layout, context_limit, scheduler_config
from replicas.engine.kv_cache import KVCacheManager
from replicas.engine.requests import EngineRequest, RequestUpdate
from replicas.engine.runner import ModelRunner
from replicas.engine.sampler import RowState
from replicas.engine.scheduler import Scheduler
from replicas.engine.step_failures import FailureRun
from replicas.engine.step_rates import StepRates
from replicas.engine.stop_strings import StopStringMatcher
from replicas.experts.dispatch import ExpertDispatcher, ExpertsUnavailable

# a step whose expert calls failed (a shard lost or replaced, `ExpertsUnavailable`): its requests
# end with this Retry-After; Serve replaces a lost shard or pool in seconds (docs/operations.md)
EXPERTS_RETRY_AFTER_S = 5.0
# a request refused by the queue-time bound: the replica was overloaded that long already
QUEUE_RETRY_AFTER_S = 2.0


class InvalidRequest(ValueError):
    """A request the engine refuses; `field` names the parameter at fault (OpenAI error style)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class _Live:
    """Engine-side state of one request."""

    row: RowState
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    num_prompt: int
    added_s: float  # arrival at the API, on this process's monotonic clock
    num_cached: int = 0
    token_ids: list[int] = field(default_factory=list)
    queue_s: float | None = None  # set when first scheduled


class Engine:
    def __init__(
        self,
        model: MiMoForCausalLM,
        tokenizer: Tokenizer,
        config: EngineConfig,
        dispatcher: ExpertDispatcher | None = None,  # None: the model's own experts run in process
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.max_model_len = context_limit(model.config, config.max_model_len)
        config.validate(model.config, checkpoint=model.source)  # names the checkpoint on a bad MTP ask
        layout = build_layout(model.config, config)
        self.kv_cache = KVCacheManager(layout, enable_prefix_cache=config.enable_prefix_cache)
        self.scheduler = Scheduler(scheduler_config(model.config, config), self.kv_cache)
        self.runner = ModelRunner(model, layout, config.num_mtp_drafts, config.max_draft_batch, dispatcher)
        self.device = self.runner.paged.device
        self._live: dict[str, _Live] = {}
        self.stats = {
            "drafts": 0,
            "drafted_tokens": 0,
            "accepted_draft_tokens": 0,
            "steps": 0,
            "queue_expired": 0,  # requests ended by the queue-time bound
        }
        self.rates = StepRates()  # measured step time and prefill rate, for the routers' cost
        self.failures = FailureRun()  # failed steps since the last good one: the replica's health

    # -- requests ---------------------------------------------------------------------------
    def add(self, request: GenerateRequest) -> None:
        self.validate(request)
        p = request.params
        eos = self.tokenizer.eos_token_ids
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
        self.scheduler.add(
            EngineRequest(
                request_id=request.request_id,
                prompt_token_ids=tuple(request.prompt_token_ids),
                max_tokens=p.max_tokens,
                stop_token_ids=frozenset(stop_ids),
                priority=request.priority,
                salt=request.salt,
            )
        )
        self._live[request.request_id] = _Live(
            row=RowState.create(p, request.prompt_token_ids, eos, self.device),
            detok=IncrementalDetokenizer(self.tokenizer),
            stops=StopStringMatcher(p.stop),
            num_prompt=len(request.prompt_token_ids),
            added_s=time.monotonic() - max(0.0, time.time() - request.arrival_s),
        )

    def abort(self, request_id: str) -> None:
        """Ends a request whose client has gone: no final chunk, and nothing of it is kept."""
        if self._live.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    def validate(self, request: GenerateRequest) -> None:
        if request.request_id in self._live:
            raise InvalidRequest("request_id", f"request_id {request.request_id!r} is already running")
        ids = request.prompt_token_ids
        if len(ids) == 0:
            raise InvalidRequest("prompt", "prompt is empty: at least one token is needed")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                "prompt",
                f"prompt has {len(ids)} tokens; the context (max_position_embeddings / max_model_len) "
                f"is {self.max_model_len} tokens and must leave room for one generated token",
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest("prompt", f"prompt token ids must be in [0, {vocab})")
        try:
            request.params.validate(vocab)
        except InvalidSamplingParameter as e:
            raise InvalidRequest(e.field, str(e)) from None

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[Chunk]:
        started = time.monotonic()
        expired = self._expire_waiting(started)
        plan = self.scheduler.schedule()
        now = time.monotonic()
        for s in plan.scheduled:
            live = self._live[s.request_id]
            if live.queue_s is None:
                live.queue_s = now - live.added_s
        rows = {s.request_id: self._live[s.request_id].row for s in plan.scheduled}
        tokens = {s.request_id: self.scheduler.token_ids(s.request_id) for s in plan.scheduled}
        try:
            output = self.runner.execute(plan, rows, tokens)
        except Exception as e:  # a failed forward fails its requests, not the engine
            message = f"engine step failed: {type(e).__name__}: {e}"
            updates = self.scheduler.fail_step(plan, message)
            chunks = [c for u in updates if (c := self._on_update(u, None)) is not None]
            if isinstance(e, ExpertsUnavailable):  # transient: the same request may succeed again
                chunks = [replace(c, retry_after_s=EXPERTS_RETRY_AFTER_S) for c in chunks]
            else:  # this replica's own failure
                self.failures.failed(time.monotonic(), message)
            return expired + chunks
        for s in plan.scheduled:
            self.stats["drafted_tokens"] += len(s.draft_token_ids)
            self.stats["drafts"] += bool(s.draft_token_ids)
        self.stats["steps"] += 1
        if plan.scheduled:
            self.failures.succeeded()
        extras = {o.request_id: o.extras for o in output.seqs}
        chunks = expired
        for update in self.scheduler.update(plan, output):
            chunk = self._on_update(update, extras.get(update.request_id))
            if chunk is not None:
                chunks.append(chunk)
        for s, o in zip(plan.scheduled, output.seqs, strict=True):
            if s.draft_token_ids and o.sampled_token_ids:
                self.stats["accepted_draft_tokens"] += len(o.sampled_token_ids) - 1
        if plan.scheduled:
            ended = time.monotonic()
            prefill_tokens = sum(len(s.token_ids) for s in plan.scheduled if s.is_prefill_chunk)
            self.rates.record(ended, ended - started, prefill_tokens)
        return chunks

    def _expire_waiting(self, now: float) -> list[Chunk]:
        """Requests not yet started `max_queue_wait_s` after their arrival end with a retriable
        error, so an overloaded replica answers 503 + Retry-After within a stated time instead of
        a first token minutes later. A preempted request has streamed already and is never cut.
        (Wall-clock dependent: tensor-parallel ranks would each decide alone; TP is not served.)"""
        bound = self.config.max_queue_wait_s
        if bound is None:
            return []
        chunks = []
        for request_id in self.scheduler.waiting_ids():
            live = self._live[request_id]
            waited = now - live.added_s
            if waited <= bound or not self.scheduler.drop_waiting(request_id):
                continue
            del self._live[request_id]
            self.stats["queue_expired"] += 1
            chunks.append(
                Chunk(
                    request_id,
                    [],
                    "",
                    "error",
                    Usage(live.num_prompt, 0, 0, waited),
                    error=f"not started within max_queue_wait_s={bound:g} s of arrival (waited "
                    f"{waited:.1f} s): the replica is overloaded",
                    retry_after_s=QUEUE_RETRY_AFTER_S,
                )
            )
        return chunks

    def _on_update(self, update: RequestUpdate, extras: object) -> Chunk | None:
        live = self._live.get(update.request_id)
        if live is None:
            return None
        live.num_cached = update.num_cached_tokens
        new_ids = update.new_token_ids
        live.row.output_token_ids.extend(new_ids)
        live.token_ids.extend(new_ids)
        text = "".join(live.detok.push(t) for t in new_ids)
        if len(live.token_ids) - len(new_ids) >= live.row.params.min_tokens:
            emitted, stopped = live.stops.push(text)
        else:  # stop strings count only once min_tokens are out, as for stop token ids
            emitted, stopped = text, False
        finish = update.finish_reason
        if stopped and finish is None:
            self.scheduler.abort(update.request_id)
            finish = "stop"
        if finish is not None and not stopped:
            emitted += live.stops.push(live.detok.flush())[0] + live.stops.flush()
        if not new_ids and finish is None:
            return None
        logprobs = extras if isinstance(extras, TokenLogprobs) else None
        usage = None
        if finish is not None:
            del self._live[update.request_id]
            usage = Usage(live.num_prompt, len(live.token_ids), live.num_cached, live.queue_s or 0.0)
        return Chunk(update.request_id, new_ids, emitted, finish, usage, logprobs, update.error)

    # -- offline ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerateRequest]) -> dict[str, list[Chunk]]:
        """Runs the requests to completion; returns each request's chunks in order."""
        out: dict[str, list[Chunk]] = {}
        for r in requests:
            self.add(r)
            out[r.request_id] = []
        while self.has_work():
            for chunk in self.step():
                out[chunk.request_id].append(chunk)
        return out
