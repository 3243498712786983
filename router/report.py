"""What an attention replica publishes for routers: its KV block events as a numbered log, and load.

Serve hands each router only the latest report, polled at times the replica does not control, so
the report is built for routers that missed some: every event run carries a sequence number, the
last few reports' events are retained, a full snapshot of held hashes rides along when a router
may be behind the window, and an epoch (new per builder) tells routers a restarted replica holds
nothing. Hashes travel as base64 of packed little-endian uint64 (cheap to pack, parse and hash).
"""

from __future__ import annotations

import base64
import sys
import threading
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

REPORT_FORMAT = 1
PoolName = Literal["full", "swa"]
EventKind = Literal["stored", "removed"]


class KVEventLike(Protocol):
    """`replicas.block_pool.KVEvent` (duck-typed: this package may not import `replicas`)."""

    @property
    def kind(self) -> str: ...
    @property
    def block_hashes(self) -> tuple[int, ...]: ...
    @property
    def pool(self) -> str: ...


def encode_hashes(hashes: Iterable[int]) -> str:
    packed = array("Q", hashes)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def decode_hashes(text: str) -> array[int]:
    packed = array("Q")
    packed.frombytes(base64.b64decode(text))
    if sys.byteorder != "little":
        packed.byteswap()
    return packed


@dataclass(frozen=True)
class LogEvent:
    seq: int  # 1, 2, ... within an epoch: one event run each
    kind: EventKind
    pool: PoolName
    hashes: tuple[int, ...]


@dataclass(frozen=True)
class Snapshot:
    """The held sets after every event up to and including `seq`, still encoded: a router in sync
    never decodes it (tens of thousands of hashes), one behind the log does."""

    seq: int
    full: str
    swa: str

    def decode(self) -> tuple[set[int], set[int]]:
        return set(decode_hashes(self.full)), set(decode_hashes(self.swa))


@dataclass(frozen=True)
class ReplicaReport:
    """A parsed report. Events with seq in [log_start, log_end] are all in `events`, in order."""

    epoch: str
    report_seq: int
    recorded_at: float  # the replica's wall clock (informational; freshness uses receive time)
    block_size: int
    window: int  # SWA window in tokens, as in `KVLayout.window`
    num_running: int
    num_waiting: int
    kv_usage: float  # 0..1
    log_start: int
    log_end: int  # last seq assigned; 0 before any event
    events: tuple[LogEvent, ...]
    snapshot: Snapshot | None


def parse_report(data: Mapping[str, Any]) -> ReplicaReport | None:
    """The report in `data`, or None when it is not one (an empty or foreign routing-stats dict)."""
    if data.get("format") != REPORT_FORMAT:
        return None
    events = tuple(
        LogEvent(int(seq), kind, pool, tuple(decode_hashes(text))) for seq, kind, pool, text in data["events"]
    )
    snapshot_data = data.get("snapshot")
    snapshot = None
    if snapshot_data is not None:
        snapshot = Snapshot(int(snapshot_data["seq"]), str(snapshot_data["full"]), str(snapshot_data["swa"]))
    return ReplicaReport(
        epoch=str(data["epoch"]),
        report_seq=int(data["report_seq"]),
        recorded_at=float(data["recorded_at"]),
        block_size=int(data["block_size"]),
        window=int(data["window"]),
        num_running=int(data["num_running"]),
        num_waiting=int(data["num_waiting"]),
        kv_usage=float(data["kv_usage"]),
        log_start=int(data["log_start"]),
        log_end=int(data["log_end"]),
        events=events,
        snapshot=snapshot,
    )


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
    """Fed the engine's drained KV events; `build(load)` returns the JSON-able routing-stats dict.

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

    def build(self, num_running: int, num_waiting: int, kv_usage: float) -> dict[str, Any]:
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
                snapshot = {
                    "seq": self._last_seq,
                    "full": encode_hashes(self._held["full"]),
                    "swa": encode_hashes(self._held["swa"]),
                }
            report = {
                "format": REPORT_FORMAT,
                "epoch": self.epoch,
                "report_seq": self._report_seq,
                "recorded_at": self._clock(),
                "block_size": self.block_size,
                "window": self.window,
                "num_running": int(num_running),
                "num_waiting": int(num_waiting),
                "kv_usage": float(kv_usage),
                "log_start": log_start,
                "log_end": self._last_seq,
                "events": [[e.seq, e.kind, e.pool, encode_hashes(e.hashes)] for _, e in self._log],
                "snapshot": snapshot,
            }
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
