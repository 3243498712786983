"""The replica's routing report: numbered event log, retention, snapshots, epochs, hash encoding."""

from __future__ import annotations

import pickle
import random

import pytest

from protocol.block_hash import block_hashes
from protocol.report import Snapshot, pack_hashes, report_in, routing_stats, unpack_hashes
from replicas.engine.block_pool import KVEvent
from replicas.engine.kv_cache import KVCacheManager
from replicas.engine.kv_layout import KVLayout
from router.report import ReplicaReportBuilder, ReportConfig

DEFAULT_REPORTS = ReportConfig()


def stored(*hashes: int, pool: str = "full") -> KVEvent:
    return KVEvent("stored", tuple(hashes), pool)  # type: ignore[arg-type]


def removed(*hashes: int, pool: str = "full") -> KVEvent:
    return KVEvent("removed", tuple(hashes), pool)  # type: ignore[arg-type]


def builder(config: ReportConfig = DEFAULT_REPORTS, epoch: str = "e1") -> ReplicaReportBuilder:
    return ReplicaReportBuilder(block_size=4, window=8, config=config, epoch=epoch, clock=lambda: 123.5)


def snapshot_of(snapshot: Snapshot | None) -> tuple[int, set[int], set[int]]:
    assert snapshot is not None
    full, swa = snapshot.decode()
    return snapshot.seq, full, swa


def test_hash_encoding_round_trips_the_full_uint64_range() -> None:
    """Catches a signed or truncated packing of hashes (they are unsigned 64-bit)."""
    hashes = [0, 1, 2**63, 2**64 - 1, 12345678901234567890]
    assert list(unpack_hashes(pack_hashes(hashes))) == hashes
    assert list(unpack_hashes(pack_hashes([]))) == []


def test_report_crosses_processes_and_comes_back_exactly() -> None:
    """Catches a report that Serve cannot ship (it pickles routing stats) or that arrives as other
    values."""
    b = builder()
    b.add_events([stored(11, 12), stored(13, pool="swa"), removed(11)])
    data = routing_stats(b.build(num_running=3, num_waiting=2, kv_usage=0.25))
    report = report_in(pickle.loads(pickle.dumps(data)))
    assert report is not None and report == report_in(data)
    assert (report.epoch, report.report_seq, report.recorded_at) == ("e1", 1, 123.5)
    assert (report.block_size, report.window) == (4, 8)
    assert (report.num_running, report.num_waiting, report.kv_usage) == (3, 2, 0.25)
    assert (report.log_start, report.log_end) == (1, 3)
    assert [(e.seq, e.kind, e.pool, e.hashes) for e in report.events] == [
        (1, "stored", "full", (11, 12)),
        (2, "stored", "swa", (13,)),
        (3, "removed", "full", (11,)),
    ]
    assert report.snapshot is None  # nothing left the log: a router can replay from seq 1
    assert (b.num_held("full"), b.num_held("swa")) == (1, 1)


def test_foreign_routing_stats_are_not_reports() -> None:
    """Catches a router crashing on a replica that publishes other (or no) routing stats."""
    assert report_in({}) is None
    assert report_in(None) is None
    assert report_in({"mimo_replica_report": {"epoch": "x"}, "other": 1}) is None


def test_unknown_event_kind_is_rejected() -> None:
    """Catches an event silently misapplied (e.g. a typo'd kind treated as removal)."""
    with pytest.raises(ValueError, match="unknown KV event 'evicted'"):
        builder().add_events([KVEvent("evicted", (1,), "full")])  # type: ignore[arg-type]


def test_events_stay_for_retain_reports_then_a_snapshot_covers_them() -> None:
    """Catches a log that grows forever, or one that drops events without offering a snapshot."""
    b = builder(ReportConfig(retain_reports=2, snapshot_every=100, inline_snapshot_hashes=0))
    b.add_events([stored(1)])
    r1 = b.build(0, 0, 0.0)
    b.add_events([stored(2)])
    r2 = b.build(0, 0, 0.0)
    b.add_events([stored(3), removed(1)])
    r3 = b.build(0, 0, 0.0)
    r4 = b.build(0, 0, 0.0)
    assert r1 is not None and r2 is not None and r3 is not None and r4 is not None
    assert [(r.log_start, r.log_end) for r in (r1, r2, r3, r4)] == [(1, 1), (1, 2), (2, 4), (3, 4)]
    assert [e.seq for e in r3.events] == [2, 3, 4]
    assert [e.seq for e in r4.events] == [3, 4]
    # Routers that saw the previous report can still catch up, so no snapshot is needed yet.
    assert r3.snapshot is None and r4.snapshot is None


def test_snapshot_every_n_reports_once_events_were_dropped() -> None:
    """Catches a late-joining router that never gets a snapshot and so never learns old blocks."""
    b = builder(ReportConfig(retain_reports=1, snapshot_every=3, inline_snapshot_hashes=0))
    b.add_events([stored(5, 6)])
    snapshots = []
    for _ in range(6):
        report = b.build(0, 0, 0.0)
        assert report is not None
        snapshots.append(report.snapshot)
    assert [s is not None for s in snapshots] == [False, False, True, False, False, True]
    assert snapshot_of(snapshots[2]) == (1, {5, 6}, set())


def test_small_held_sets_ride_in_every_report() -> None:
    """Catches a new router waiting a whole snapshot period although the snapshot is tiny."""
    b = builder(ReportConfig(retain_reports=1, snapshot_every=100, inline_snapshot_hashes=3))
    b.add_events([stored(1, 2), stored(9, pool="swa")])
    b.build(0, 0, 0.0)
    second = b.build(0, 0, 0.0)  # the log dropped report 1's events
    assert second is not None and snapshot_of(second.snapshot) == (2, {1, 2}, {9})
    b.add_events([stored(3)])  # 4 held > 3: no inline snapshot any more
    b.build(0, 0, 0.0)
    fourth = b.build(0, 0, 0.0)
    assert fourth is not None and fourth.snapshot is None


def test_hash_cap_forces_a_snapshot_when_even_an_up_to_date_router_would_have_a_gap() -> None:
    """Catches a burst of events larger than the log cap leaving every router silently behind."""
    b = builder(
        ReportConfig(retain_reports=4, max_log_hashes=3, snapshot_every=100, inline_snapshot_hashes=0)
    )
    b.add_events([stored(1)])
    b.build(0, 0, 0.0)
    b.add_events([stored(2, 3), stored(4, 5)])  # 5 hashes in the log > 3: seq 1 and 2 drop
    report = b.build(0, 0, 0.0)
    assert report is not None
    assert (report.log_start, report.log_end) == (3, 3)
    assert snapshot_of(report.snapshot) == (3, {1, 2, 3, 4, 5}, set())


def test_each_builder_has_its_own_epoch() -> None:
    """Catches a restarted replica reusing an epoch, so routers would keep its lost blocks."""
    first = ReplicaReportBuilder(block_size=4, window=8)
    second = ReplicaReportBuilder(block_size=4, window=8)
    assert first.epoch != second.epoch and len(first.epoch) == 32


def test_builder_mirrors_the_engine_pools_exactly() -> None:
    """Catches a report whose held sets drift from the KV manager's real prefix cache."""
    rng = random.Random(7)
    kv = KVCacheManager(KVLayout(block_size=4, num_full_blocks=12, num_swa_blocks=8, window=4))
    b = builder()
    seen: set[int] = set()
    for step in range(40):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]  # small alphabet: shared prefixes
        hashes = block_hashes(tokens, 4)
        seen.update(hashes)
        hit = kv.lookup(hashes, len(tokens))
        if kv.allocate(f"s{step}", hit, len(tokens) - hit, block_hashes=hashes):
            kv.commit(f"s{step}", hashes, len(tokens))
            kv.free(f"s{step}")
        b.add_events(kv.drain_events())
    report = b.build(0, 0, 0.0)
    assert report is not None
    full = {h for h in seen if kv.full_pool.cached_block(h) is not None}
    swa = {h for h in seen if kv.swa_pool.cached_block(h) is not None}
    replayed: dict[str, set[int]] = {"full": set(), "swa": set()}
    for event in report.events:
        if event.kind == "stored":
            replayed[event.pool].update(event.hashes)
        else:
            replayed[event.pool].difference_update(event.hashes)
    assert replayed == {"full": full, "swa": swa}
    assert (b.num_held("full"), b.num_held("swa")) == (len(full), len(swa))
    assert len(full) > 4 and len(swa) > 0  # the workload really cached ...
    assert {e.pool for e in report.events if e.kind == "removed"} == {"full", "swa"}  # ... and evicted


def test_measured_rates_travel_and_an_older_report_reads_them_as_unmeasured() -> None:
    """Catches the protocol change breaking an older replica's report (pickled without the new
    fields: routers must read None and fall back to their defaults) or dropping the rates."""
    report = builder().build(1, 0, 0.1, step_s=0.012, prefill_tokens_per_s=5000.0)
    assert (report.step_s, report.prefill_tokens_per_s) == (0.012, 5000.0)
    assert builder().build(1, 0, 0.1).step_s is None
    old = object.__new__(type(report))  # what unpickling an older replica's report gives
    old.__dict__.update(
        {k: v for k, v in report.__dict__.items() if k not in ("step_s", "prefill_tokens_per_s")}
    )
    old = pickle.loads(pickle.dumps(old))
    assert (old.step_s, old.prefill_tokens_per_s, old.num_running) == (None, None, 1)
