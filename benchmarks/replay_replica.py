"""A simulated attention replica for the routing replay: the engine's step loop at request level.

Mirrors `replicas.engine.scheduler` closely enough for routing: each step runs every decoding
sequence one token and prefill chunks (FIFO, `max_prefill_chunk` each, within the step's token
budget); waiting requests are admitted FIFO while a sequence slot and KV blocks are free. A step
takes `step_overhead_s + step_s_per_seq * decodes + prefill_tokens / prefill_tokens_per_s`
(`benchmarks/routing_calibrate.py` measured these on the tiny model). The prefix cache is one GA
pool of `num_blocks` blocks (no SWA window): a request's prompt blocks are registered when its
prefill ends, referenced while it runs, and evicted least recently used once free. Block events go
through the project's `ReplicaReportBuilder`, so the routers read real reports. Pure and
deterministic: time is passed in.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from protocol.report import ReplicaReport
from router.report import ReplicaReportBuilder

# the measured step time and prefill rate average busy steps over about this long (an engine that
# reports the last step's time swings with every prefill chunk, and routing follows the swings)
MEASURE_TAU_S = 10.0


@dataclass(frozen=True)
class ReplicaParams:
    num_blocks: int  # GA blocks of KV (cached prefixes and running sequences share them)
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 576
    max_prefill_chunk: int = 512
    step_overhead_s: float = 0.0063  # routing_calibration.json (tiny model, 1 thread)
    step_s_per_seq: float = 0.00031
    prefill_tokens_per_s: float = 4694.0


@dataclass(frozen=True)
class KVEvent:
    """What `ReplicaReportBuilder.add_events` reads (`KVEventLike`)."""

    kind: str
    block_hashes: tuple[int, ...]
    pool: str = "full"


@dataclass
class SimRequest:
    request_id: str
    router_index: int
    hashes: tuple[int, ...]  # the prompt's full blocks, chained (protocol.block_hash)
    num_prompt_tokens: int
    num_output_tokens: int
    arrived_at: float  # at the replica
    admitted_at: float | None = None
    first_token_at: float | None = None
    completed_at: float | None = None
    num_cached_tokens: int = 0
    num_to_prefill: int = 0
    held: list[int] = field(default_factory=list)  # cached block hashes it references
    num_private_blocks: int = 0  # blocks it allocated that are not (yet) shared


class SimReplica:
    def __init__(self, replica_id: str, params: ReplicaParams) -> None:
        self.replica_id = replica_id
        self.params = params
        self.reports = ReplicaReportBuilder(params.block_size, window=0, epoch=replica_id, clock=self._clock)
        self.now = 0.0
        self._cached: OrderedDict[int, int] = OrderedDict()  # hash -> references; LRU order, oldest first
        self._num_free_cached = 0  # cached blocks with no reference (evictable)
        self._num_private = 0  # allocated blocks outside the cache
        self._waiting: deque[SimRequest] = deque()
        self._prefilling: list[SimRequest] = []
        self._decode_heap: list[tuple[int, int, SimRequest]] = []  # (finishing step, tiebreak, request)
        self._num_steps = 0
        self._tiebreak = 0
        self.step_ends_at: float | None = None  # None: idle
        self._step_plan: list[tuple[SimRequest, int]] = []
        self._step_decodes = 0
        self.measured_step_s = params.step_overhead_s + params.step_s_per_seq
        self.measured_prefill_tokens_per_s = params.prefill_tokens_per_s

    def _clock(self) -> float:
        return self.now

    @property
    def num_requests(self) -> int:
        """Running + waiting (the truth a router's load estimate is measured against)."""
        return len(self._waiting) + len(self._prefilling) + len(self._decode_heap)

    @property
    def kv_usage(self) -> float:
        in_use = self._num_private + len(self._cached) - self._num_free_cached
        return in_use / self.params.num_blocks

    def report(self) -> ReplicaReport:
        num_running = len(self._prefilling) + len(self._decode_heap)
        return self.reports.build(
            num_running,
            len(self._waiting),
            self.kv_usage,
            step_s=self.measured_step_s,
            prefill_tokens_per_s=self.measured_prefill_tokens_per_s,
        )

    def submit(self, request: SimRequest, now: float) -> None:
        num_blocks = -(-(request.num_prompt_tokens + request.num_output_tokens) // self.params.block_size)
        if num_blocks > self.params.num_blocks:
            raise ValueError(f"a request of {num_blocks} blocks never fits {self.params.num_blocks}")
        self.now = now
        self._waiting.append(request)
        if self.step_ends_at is None:
            self._plan_step()

    def finish_step(self, now: float) -> list[SimRequest]:
        """Ends the step planned to end at `now`: returns the requests that completed in it."""
        self.now = now
        self._num_steps += 1
        for request, num_tokens in self._step_plan:
            request.num_to_prefill -= num_tokens
            if request.num_to_prefill == 0:
                self._prefilling.remove(request)
                request.first_token_at = now
                self._register(request)
                self._tiebreak += 1
                finish = self._num_steps + request.num_output_tokens - 1  # its first token came now
                heapq.heappush(self._decode_heap, (finish, self._tiebreak, request))
        done = []
        while self._decode_heap and self._decode_heap[0][0] <= self._num_steps:
            request = heapq.heappop(self._decode_heap)[2]
            request.completed_at = now
            self._release(request)
            done.append(request)
        self._plan_step()
        return done

    def _plan_step(self) -> None:
        p = self.params
        self._admit()
        num_decodes = len(self._decode_heap)
        budget = p.max_num_batched_tokens - num_decodes
        plan = []
        for request in self._prefilling:
            if budget <= 0:
                break
            num_tokens = min(request.num_to_prefill, p.max_prefill_chunk, budget)
            plan.append((request, num_tokens))
            budget -= num_tokens
        if not plan and not num_decodes:
            self.step_ends_at = None
            return
        num_prefill = sum(n for _, n in plan)
        step_s = p.step_overhead_s + p.step_s_per_seq * num_decodes + num_prefill / p.prefill_tokens_per_s
        weight = 1.0 - math.exp(-step_s / MEASURE_TAU_S)
        self.measured_step_s += weight * (step_s - self.measured_step_s)
        if num_prefill:  # what an engine can measure: prefill tokens per second of a prefill step
            rate = num_prefill / step_s
            self.measured_prefill_tokens_per_s += weight * (rate - self.measured_prefill_tokens_per_s)
        self._step_plan = plan
        self.step_ends_at = self.now + step_s

    def _admit(self) -> None:
        p = self.params
        while self._waiting and len(self._prefilling) + len(self._decode_heap) < p.max_num_seqs:
            request = self._waiting[0]
            max_hit = (request.num_prompt_tokens - 1) // p.block_size
            num_hit = 0
            while num_hit < min(max_hit, len(request.hashes)) and request.hashes[num_hit] in self._cached:
                num_hit += 1
            total = -(-(request.num_prompt_tokens + request.num_output_tokens) // p.block_size)
            num_new = total - num_hit
            # the hit blocks that are free now become referenced, so they cannot pay for new ones
            num_free_hits = sum(self._cached[h] == 0 for h in request.hashes[:num_hit])
            if (
                num_new
                > p.num_blocks - self._num_private - len(self._cached) + self._num_free_cached - num_free_hits
            ):
                return  # not enough KV: the head waits (FIFO), as the scheduler's admission does
            self._waiting.popleft()
            for block_hash in request.hashes[:num_hit]:
                self._reference(block_hash)
            request.held = list(request.hashes[:num_hit])
            self._evict(num_new)
            self._num_private += num_new
            request.num_private_blocks = num_new
            request.admitted_at = self.now
            request.num_cached_tokens = num_hit * p.block_size
            request.num_to_prefill = request.num_prompt_tokens - request.num_cached_tokens
            self._prefilling.append(request)

    def _reference(self, block_hash: int) -> None:
        if self._cached[block_hash] == 0:
            self._num_free_cached -= 1
        self._cached[block_hash] += 1
        self._cached.move_to_end(block_hash)

    def _evict(self, num_needed: int) -> None:
        """Frees cached blocks, least recently used first, until `num_needed` fit."""
        num_short = num_needed - (self.params.num_blocks - self._num_private - len(self._cached))
        if num_short <= 0:
            return
        removed = []
        for block_hash, refs in self._cached.items():
            if refs == 0:
                removed.append(block_hash)
                if len(removed) == num_short:
                    break
        for block_hash in removed:
            del self._cached[block_hash]
        self._num_free_cached -= len(removed)
        if removed:
            self.reports.add_events([KVEvent("removed", tuple(removed))])

    def _register(self, request: SimRequest) -> None:
        """Its prompt's full blocks past the hit become cached (one private block each moves over)."""
        num_prompt_blocks = min(len(request.hashes), request.num_prompt_tokens // self.params.block_size)
        stored = []
        for block_hash in request.hashes[len(request.held) : num_prompt_blocks]:
            self._num_private -= 1  # the block leaves the request's own allocation ...
            request.num_private_blocks -= 1
            if block_hash in self._cached:  # ... for the copy another request computed meanwhile
                self._reference(block_hash)
            else:
                self._cached[block_hash] = 1
                stored.append(block_hash)
            request.held.append(block_hash)
        if stored:
            self.reports.add_events([KVEvent("stored", tuple(stored))])

    def _release(self, request: SimRequest) -> None:
        for block_hash in request.held:
            self._cached[block_hash] -= 1
            if self._cached[block_hash] == 0:
                self._num_free_cached += 1
        self._num_private -= request.num_private_blocks
        request.held, request.num_private_blocks = [], 0
