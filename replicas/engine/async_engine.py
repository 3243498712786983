"""Async front of the engine for the serving layer: `submit(request)` streams `Chunk`s.

One background thread owns the `Engine` and steps it while there is work; callers on any asyncio
loop get their chunks through per-request queues (`call_soon_threadsafe`), so the event loop never
blocks on a forward pass. Closing a stream early (client gone, task cancelled) aborts the request
and frees its KV blocks. Invalid requests raise `InvalidRequest` from `submit` before streaming.
Chunks already queued when the consumer asks are merged into one, and with `stream_interval_s`
a stream's chunks after the first go out at most that often (the tokens in between travel
together and none waits longer than the interval; the first and the finishing chunk never wait).
After every step the thread publishes an `EngineSnapshot` (load and KV usage) and buffers the
prefix cache's block events, both readable from any thread, for the router and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from protocol.messages import Chunk, GenerateRequest
from replicas.engine.block_pool import KVEvent
from replicas.engine.engine import Engine


@dataclass(frozen=True)
class EngineSnapshot:
    num_running: int
    num_waiting: int
    kv_usage: dict[str, float]  # used fraction per pool: "full" (GA layers), "swa" (SWA + MTP)
    num_steps: int
    num_drafts: int  # sequence-steps that carried drafts
    num_drafted_tokens: int
    num_accepted_draft_tokens: int
    num_preemptions: int
    step_s: float | None = None  # mean recent step time (replicas.engine.step_rates); None: no step yet
    prefill_tokens_per_s: float | None = None  # recent prefill rate; None: no prefill yet
    stuck_reason: str | None = None  # set while the engine keeps failing (replicas.engine.step_failures)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk | BaseException]
    ended: asyncio.Event  # the finishing chunk (or an error) is queued: a paced wait ends now

    def put(self, item: Chunk | BaseException) -> None:
        """On the stream's loop."""
        self.queue.put_nowait(item)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.ended.set()


class AsyncEngine:
    def __init__(self, engine: Engine, stream_interval_s: float = 0.0) -> None:
        if stream_interval_s < 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {stream_interval_s}")
        self.engine = engine
        self.stream_interval_s = stream_interval_s
        self._commands: queue.Queue[tuple[str, object]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()
        self._kv_events: list[KVEvent] = []
        self._snapshot = self._take_snapshot()
        self._thread = threading.Thread(target=self._loop, name="mimo-engine", daemon=True)
        self._thread.start()

    async def submit(self, request: GenerateRequest) -> AsyncGenerator[Chunk, None]:
        """Validates now (raising InvalidRequest), then yields chunks until the finishing one."""
        if self._stopped:
            raise RuntimeError("engine is shut down")
        self.engine.validate(request)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), asyncio.Event())
        self._streams[request.request_id] = stream
        self._send("add", request)
        return self._iterate(request.request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncGenerator[Chunk, None]:
        """Chunks that piled up while the consumer was busy go out as one: no token waits for it
        (all of them are here already), and a consumer that pays per item (a Serve stream, an SSE
        event) pays once per backlog instead of once per token, so it catches up instead of falling
        further behind the engine. Pacing (`stream_interval_s`) makes that the rule: every token still
        leaves within the interval, and the hops behind (replica -> gateway -> proxy) carry a chunk per
        interval instead of one per step (lower TTFT under load: `benchmarks/NOTES.md`)."""
        finished = False
        error: BaseException | None = None
        last_sent: float | None = None
        try:
            while True:
                item = error or await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if last_sent is not None and item.finish_reason is None and self.stream_interval_s > 0:
                    wait = last_sent + self.stream_interval_s - stream.loop.time()
                    if wait > 0:  # later tokens queue up meanwhile and are merged below
                        with contextlib.suppress(TimeoutError):  # the end does not wait
                            await asyncio.wait_for(stream.ended.wait(), wait)
                while item.finish_reason is None and not stream.queue.empty():
                    later = stream.queue.get_nowait()
                    if isinstance(later, BaseException):
                        error = later  # raised after what came before it
                        break
                    item = item.followed_by(later)
                yield item
                last_sent = stream.loop.time()
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    @property
    def num_streams(self) -> int:
        """Requests submitted and not yet finished (running, waiting, or about to be added)."""
        return len(self._streams)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    def drain_kv_events(self) -> list[KVEvent]:
        with self._lock:
            events, self._kv_events = self._kv_events, []
        return events

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _send(self, kind: str, payload: object) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_work():
                self._publish()  # aborts and frees since the last step
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for chunk in self.engine.step():
                self._deliver(chunk.request_id, chunk)
            self._publish()

    def _publish(self) -> None:
        events = self.engine.kv_cache.drain_events()
        if events:
            with self._lock:
                self._kv_events.extend(events)
        self._snapshot = self._take_snapshot()

    def _take_snapshot(self) -> EngineSnapshot:
        stats = self.engine.stats
        return EngineSnapshot(
            num_running=self.engine.scheduler.num_running,
            num_waiting=self.engine.scheduler.num_waiting,
            kv_usage={name: u.used_fraction for name, u in self.engine.kv_cache.usage().items()},
            num_steps=stats["steps"],
            num_drafts=stats["drafts"],
            num_drafted_tokens=stats["drafted_tokens"],
            num_accepted_draft_tokens=stats["accepted_draft_tokens"],
            num_preemptions=self.engine.scheduler.num_preemptions_total,
            step_s=self.engine.rates.step_s,
            prefill_tokens_per_s=self.engine.rates.prefill_tokens_per_s,
            stuck_reason=self.engine.failures.stuck_reason(),
        )

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                assert isinstance(payload, GenerateRequest)
                try:
                    self.engine.add(payload)
                except ValueError as e:  # raced with another request of the same id, or invalid
                    self._deliver(payload.request_id, e)
            else:
                assert isinstance(payload, str)
                self.engine.abort(payload)

    def _deliver(self, request_id: str, item: Chunk | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.put, item)
