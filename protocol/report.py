"""What an attention replica reports to routers: its prefix-cache block events and its load.

Serve hands each router only the latest report, polled at times the replica does not control, so
a report carries a numbered log of block events (the last few reports' worth), a snapshot of the
held hashes when a router may be behind that log, and an epoch (new per replica start) that tells
routers a restarted replica holds nothing. `router.report.ReplicaReportBuilder` makes them;
`router.prefix_index` applies them. Snapshots keep their hashes packed (little-endian uint64): a
router in sync never unpacks the tens of thousands of hashes one holds.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

PoolName = Literal["full", "swa"]
EventKind = Literal["stored", "removed"]
# Serve's routing stats are a dict (its API); the report is the one value under this key
ROUTING_STATS_KEY = "mimo_replica_report"


def pack_hashes(hashes: Iterable[int]) -> bytes:
    packed = array("Q", hashes)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_hashes(data: bytes) -> array[int]:
    packed = array("Q")
    packed.frombytes(data)
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
    """The held sets after every event up to and including `seq`, packed."""

    seq: int
    full: bytes
    swa: bytes

    def decode(self) -> tuple[set[int], set[int]]:
        return set(unpack_hashes(self.full)), set(unpack_hashes(self.swa))


@dataclass(frozen=True)
class ReplicaReport:
    """Events with seq in [log_start, log_end] are all in `events`, in order."""

    epoch: str
    report_seq: int
    recorded_at: float  # the replica's wall clock (informational; freshness uses receive time)
    block_size: int
    window: int  # SWA window in tokens
    num_running: int
    num_waiting: int
    kv_usage: float  # 0..1
    log_start: int
    log_end: int  # last seq assigned; 0 before any event
    events: tuple[LogEvent, ...]
    snapshot: Snapshot | None
    # measured by the replica's engine (None: not measured, e.g. an older replica; routers then use
    # their calibrated defaults). Added last with defaults, so older senders and readers still work.
    step_s: float | None = None  # mean engine step time, recent steps
    prefill_tokens_per_s: float | None = None  # prompt tokens computed per second of a prefill step


def routing_stats(report: ReplicaReport) -> dict[str, ReplicaReport]:
    """What a replica's `record_routing_stats` returns to Serve."""
    return {ROUTING_STATS_KEY: report}


def report_in(stats: Mapping[str, object] | None) -> ReplicaReport | None:
    """The report in a replica's routing stats, or None (no stats yet, or another deployment's)."""
    report = (stats or {}).get(ROUTING_STATS_KEY)
    return report if isinstance(report, ReplicaReport) else None
