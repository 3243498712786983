"""Builds the `protocol.report.ReplicaReport`s an attention replica publishes for routers, from the
engine's KV block events.

Serve hands each router only the latest report, polled at times the replica does not control, so
the builder numbers every event run, keeps the last few reports' events, adds a snapshot of the
held hashes when a router may be behind that log, and starts a new epoch per builder (a restarted
replica holds nothing).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from protocol.report import EventKind, LogEvent, PoolName, ReplicaReport, Snapshot, pack_hashes


class KVEventLike(Protocol):
    """`replicas.engine.block_pool.KVEvent` (duck-typed: this package may not import `replicas`)."""

    @property
    def kind(self) -> str: ...
    @property
    def block_hashes(self) -> tuple[int, ...]: ...
    @property
    def pool(self) -> str: ...


@dataclass(frozen=True)
class ReportConfig:
    """How much history a report carries; defaults suit a stats period of about a second."""

    retain_reports: int = 4  # events stay in this many consecutive reports (a router may miss 3)
    max_log_hashes: int = 65536  # and never more hashes than this (older runs drop first)
    snapshot_every: int = 10  # once the log has dropped events: a snapshot every N reports ...
    inline_snapshot_hashes: int = 4096  # ... or in every report while this few hashes are held

    def __post_init__(self) -> None:
        for name in ("retain_reports", "max_log_hashes", "snapshot_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReportConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.inline_snapshot_hashes < 0:
            raise ValueError(
                f"ReportConfig.inline_snapshot_hashes must be >= 0, got {self.inline_snapshot_hashes}"
            )


class ReplicaReportBuilder:
    """Fed the engine's drained KV events; `build(load)` returns the next report.

    Thread-safe (one lock): events may come from the engine thread, reports from the replica's loop.
    """

    def __init__(
        self,
        block_size: int,
        window: int,
        config: ReportConfig = ReportConfig(),
        epoch: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if block_size < 1 or window < 0:
            raise ValueError(f"block_size must be >= 1 and window >= 0, got {block_size}, {window}")
        self.block_size = block_size
        self.window = window
        self.config = config
        self.epoch = epoch if epoch is not None else uuid.uuid4().hex
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[PoolName, set[int]] = {"full": set(), "swa": set()}
        self._log: deque[tuple[int, LogEvent]] = deque()  # (report_seq that first carries it, event)
        self._num_log_hashes = 0
        self._last_seq = 0
        self._report_seq = 0
        self._has_dropped = False  # some event left the log: a router may need a snapshot
        self._last_reported_seq = 0  # log_end of the previous report

    def add_events(self, events: Iterable[KVEventLike]) -> None:
        with self._lock:
            for event in events:
                if event.kind not in ("stored", "removed") or event.pool not in ("full", "swa"):
                    raise ValueError(f"unknown KV event {event.kind!r} on pool {event.pool!r}")
                if not event.block_hashes:
                    continue
                kind: EventKind = "stored" if event.kind == "stored" else "removed"
                pool: PoolName = "full" if event.pool == "full" else "swa"
                held = self._held[pool]
                if kind == "stored":
                    held.update(event.block_hashes)
                else:
                    held.difference_update(event.block_hashes)
                self._last_seq += 1
                log_event = LogEvent(self._last_seq, kind, pool, tuple(event.block_hashes))
                self._log.append((self._report_seq + 1, log_event))
                self._num_log_hashes += len(log_event.hashes)

    def num_held(self, pool: PoolName) -> int:
        with self._lock:
            return len(self._held[pool])

    def build(
        self,
        num_running: int,
        num_waiting: int,
        kv_usage: float,
        step_s: float | None = None,
        prefill_tokens_per_s: float | None = None,
    ) -> ReplicaReport:
        """The next report; `step_s` and `prefill_tokens_per_s` are the engine's measured rates
        (None where it does not measure them: routers use their calibrated defaults)."""
        with self._lock:
            self._report_seq += 1
            self._trim_log()
            log_start = self._log[0][1].seq if self._log else self._last_seq + 1
            num_held = len(self._held["full"]) + len(self._held["swa"])
            # A router that saw the previous report cannot catch up from this log alone.
            is_gap_for_current = log_start > self._last_reported_seq + 1
            wants_snapshot = self._has_dropped and (
                is_gap_for_current
                or self._report_seq % self.config.snapshot_every == 0
                or num_held <= self.config.inline_snapshot_hashes
            )
            snapshot = None
            if wants_snapshot:
                full, swa = pack_hashes(self._held["full"]), pack_hashes(self._held["swa"])
                snapshot = Snapshot(self._last_seq, full, swa)
            report = ReplicaReport(
                epoch=self.epoch,
                report_seq=self._report_seq,
                recorded_at=self._clock(),
                block_size=self.block_size,
                window=self.window,
                num_running=int(num_running),
                num_waiting=int(num_waiting),
                kv_usage=float(kv_usage),
                log_start=log_start,
                log_end=self._last_seq,
                events=tuple(e for _, e in self._log),
                snapshot=snapshot,
                step_s=step_s,
                prefill_tokens_per_s=prefill_tokens_per_s,
            )
            self._last_reported_seq = self._last_seq
            return report

    def _trim_log(self) -> None:
        oldest_kept_report = self._report_seq - self.config.retain_reports + 1
        while self._log and (
            self._log[0][0] < oldest_kept_report or self._num_log_hashes > self.config.max_log_hashes
        ):
            _, dropped = self._log.popleft()
            self._num_log_hashes -= len(dropped.hashes)
            self._has_dropped = True
