"""The router's prefix index: the engine's hit rule, convergence of routers fed at different times,
epochs, gaps, guesses, salts, and prompt hashing that yields to the event loop."""

from __future__ import annotations

import asyncio
import random

from protocol.block_hash import block_hashes
from protocol.report import ReplicaReport
from replicas.engine.block_pool import KVEvent
from replicas.engine.kv_cache import KVCacheManager
from replicas.engine.kv_layout import KVLayout
from router.hashing import hash_prompt_blocks
from router.prefix_index import PrefixIndex, ViewState
from router.report import ReplicaReportBuilder, ReportConfig

B = 4
DEFAULT_REPORTS = ReportConfig()


def stored(hashes: list[int], pool: str = "full") -> KVEvent:
    return KVEvent("stored", tuple(hashes), pool)  # type: ignore[arg-type]


def removed(hashes: list[int], pool: str = "full") -> KVEvent:
    return KVEvent("removed", tuple(hashes), pool)  # type: ignore[arg-type]


def builder(
    window: int = 64, config: ReportConfig = DEFAULT_REPORTS, epoch: str = "e1"
) -> ReplicaReportBuilder:
    return ReplicaReportBuilder(block_size=B, window=window, config=config, epoch=epoch)


def report(b: ReplicaReportBuilder) -> ReplicaReport:
    return b.build(num_running=1, num_waiting=0, kv_usage=0.5)


PROMPT = list(range(100, 121))  # 21 tokens: 5 full blocks, at most 5 can hit ((21 - 1) // 4)
HASHES = block_hashes(PROMPT, B)


def test_match_counts_leading_ga_blocks_and_leaves_one_token() -> None:
    """Catches counting non-leading blocks, or a hit covering the whole prompt (one token must run)."""
    b = builder()
    b.add_events([stored(HASHES[:3] + HASHES[4:]), stored(HASHES, "swa")])
    index = PrefixIndex(B, guess_ttl_s=5.0)
    index.apply_report("r1", report(b), now=0.0)
    assert index.matched_blocks("r1", HASHES, len(PROMPT), now=0.0) == 3  # block 3 missing on GA
    b.add_events([stored([HASHES[3]])])
    index.apply_report("r1", report(b), now=1.0)
    assert index.matched_blocks("r1", HASHES, len(PROMPT), now=1.0) == 5
    assert index.matched_blocks("r1", HASHES, 20, now=1.0) == 4  # 20 tokens: (20 - 1) // 4
    assert index.matched_blocks("r2", HASHES, len(PROMPT), now=1.0) == 0  # unknown replica


def test_match_needs_the_swa_window_before_the_hit_end() -> None:
    """Catches a router promising a hit the engine refuses because SWA evicted the last window."""
    b = builder(window=4)  # a hit of n blocks needs SWA blocks [(4n - 4) // 4, n) = just block n - 1
    b.add_events([stored(HASHES), stored([HASHES[0], HASHES[1], HASHES[2]], "swa")])
    index = PrefixIndex(B, guess_ttl_s=5.0)
    index.apply_report("r1", report(b), now=0.0)
    assert index.matched_blocks("r1", HASHES, len(PROMPT), now=0.0) == 3  # blocks 3, 4 not in SWA
    wide = builder(window=8, epoch="e2")  # 2 blocks of window: n=3 needs SWA 1..2, n=5 needs 3..4
    wide.add_events([stored(HASHES), stored([HASHES[1], HASHES[3]], "swa")])
    index.apply_report("r2", report(wide), now=0.0)
    assert (
        index.matched_blocks("r2", HASHES, len(PROMPT), now=0.0) == 0
    )  # 5: block 4 missing; 4: block 2; 2: block 0


def test_index_agrees_with_the_engine_lookup_on_a_random_workload() -> None:
    """Catches any difference between the router's expected hit and the KV manager's real one."""
    rng = random.Random(3)
    layout = KVLayout(block_size=B, num_full_blocks=16, num_swa_blocks=10, window=6)
    kv = KVCacheManager(layout)
    b = ReplicaReportBuilder(block_size=B, window=layout.window, epoch="e")
    index = PrefixIndex(B, guess_ttl_s=0.0)
    live: list[str] = []
    num_hits = num_cut_by_swa = 0
    for step in range(150):
        tokens = [rng.randrange(2) for _ in range(rng.randrange(2, 26))]  # 2 symbols: many shared prefixes
        hashes = block_hashes(tokens, B)
        index.apply_report("r", report(b), now=float(step))
        expected = kv.lookup(hashes, len(tokens))
        assert index.matched_blocks("r", hashes, len(tokens), now=float(step)) * B == expected, step
        num_ga = 0
        while num_ga < (len(tokens) - 1) // B and kv.full_pool.cached_block(hashes[num_ga]) is not None:
            num_ga += 1
        num_hits += expected > 0
        num_cut_by_swa += num_ga * B > expected
        seq_id = f"s{step}"
        if kv.allocate(seq_id, expected, len(tokens) - expected, block_hashes=hashes):
            kv.commit(seq_id, hashes, len(tokens))
            live.append(seq_id)
        while len(live) > 2 or (live and rng.random() < 0.5):
            kv.free(live.pop(0))
        b.add_events(kv.drain_events())
    assert num_hits >= 20 and num_cut_by_swa >= 5  # real hits, and hits the SWA window cut short


def test_two_routers_fed_at_different_times_converge() -> None:
    """Catches views that depend on which reports a router happened to see."""
    b = builder(config=ReportConfig(retain_reports=3, snapshot_every=4, inline_snapshot_hashes=0))
    every, sparse, late = PrefixIndex(B, 5.0), PrefixIndex(B, 5.0), PrefixIndex(B, 5.0)
    for step in range(8):
        b.add_events([stored([1000 + step, 2000 + step]), removed([1000 + step - 2])])
        data = report(b)
        every.apply_report("r", data, now=float(step))
        if step % 2 == 1:  # misses every other report, still inside the retained log
            sparse.apply_report("r", data, now=float(step))
        if step == 7:  # joins at report 8, which carries a snapshot (8 % 4 == 0)
            late.apply_report("r", data, now=float(step))
    expected = ViewState("e1", 16, frozenset({1006, 1007} | {2000 + s for s in range(8)}), frozenset())
    assert every.view_state("r") == sparse.view_state("r") == late.view_state("r") == expected


def test_router_behind_the_log_waits_for_a_snapshot() -> None:
    """Catches a router applying a partial log after a gap (it would keep evicted blocks forever)."""
    b = builder(config=ReportConfig(retain_reports=1, snapshot_every=3, inline_snapshot_hashes=0))
    index = PrefixIndex(B, 5.0)
    b.add_events([stored(HASHES[:2])])
    index.apply_report("r", report(b), now=0.0)  # report 1: synced, cursor 1
    assert index.has_prefix_view("r")
    b.add_events([removed(HASHES[:1])])
    report(b)  # report 2 is missed: it alone carried the removal
    b.add_events([stored([7])])
    index.apply_report("r", report(b), now=1.0)  # report 3 has a snapshot: resync
    assert index.view_state("r") == ViewState("e1", 3, frozenset({HASHES[1], 7}), frozenset())
    b.add_events([stored([8])])
    report(b)  # report 4 missed
    b.add_events([stored([9])])
    index.apply_report("r", report(b), now=2.0)  # report 5: log starts at seq 5, no snapshot
    assert index.view_state("r") == ViewState("e1", None, frozenset(), frozenset())
    assert not index.has_prefix_view("r")
    index.apply_report("r", report(b), now=3.0)  # report 6 (6 % 3 == 0): snapshot
    assert index.view_state("r") == ViewState("e1", 5, frozenset({HASHES[1], 7, 8, 9}), frozenset())


def test_new_epoch_starts_the_replica_empty() -> None:
    """Catches a restarted replica (same id, empty cache) still credited with its old blocks."""
    index = PrefixIndex(B, 5.0)
    old = builder(epoch="old")
    old.add_events([stored(HASHES), stored(HASHES, "swa")])
    index.apply_report("r", report(old), now=0.0)
    assert index.matched_blocks("r", HASHES, len(PROMPT), now=0.0) == 5
    new = builder(epoch="new")
    new.add_events([stored(HASHES[:1]), stored(HASHES[:1], "swa")])
    index.apply_report("r", report(new), now=1.0)
    assert index.view_state("r") == ViewState("new", 2, frozenset(HASHES[:1]), frozenset(HASHES[:1]))
    assert index.matched_blocks("r", HASHES, len(PROMPT), now=1.0) == 1


def test_repeated_or_older_reports_are_ignored() -> None:
    """Catches a router re-applying a report (wasted work) or rolling back to an older one."""
    b = builder()
    b.add_events([stored([1])])
    first = report(b)
    b.add_events([removed([1])])
    second = report(b)
    index = PrefixIndex(B, 5.0)
    assert index.apply_report("r", second, now=0.0)
    assert not index.apply_report("r", second, now=1.0)
    assert not index.apply_report("r", first, now=2.0)
    assert index.view_state("r").full == frozenset()
    load = index.load("r", now=4.0)
    assert load is not None and load.report_age_s == 4.0


def test_guesses_count_until_confirmed_evicted_or_expired() -> None:
    """Catches guesses that never expire, or that override the replica's own eviction events."""
    index = PrefixIndex(B, guess_ttl_s=2.0)
    b = builder(window=0)
    index.apply_report("r", report(b), now=0.0)
    index.note_routed("r", HASHES, now=0.0)
    assert index.matched_blocks("r", HASHES, len(PROMPT), now=1.0) == 5
    assert index.matched_blocks("r", HASHES, len(PROMPT), now=2.0) == 0  # expired at 0 + 2
    index.note_routed("r", HASHES, now=3.0)
    b.add_events([stored(HASHES[:2]), removed(HASHES[2:3])])  # two confirmed, one evicted
    index.apply_report("r", report(b), now=3.5)
    assert index.num_guesses("r", now=3.5) == 2  # blocks 3 and 4 still only guessed
    assert index.matched_blocks("r", HASHES, len(PROMPT), now=3.5) == 2
    assert index.matched_blocks("r", HASHES, len(PROMPT), now=10.0) == 2  # the confirmed ones stay
    index.note_routed("r", HASHES, now=11.0)
    index.drop_guesses("r", HASHES)  # the request went to another replica after all
    assert index.num_guesses("r", now=11.0) == 0
    assert index.matched_blocks("r", HASHES, len(PROMPT), now=11.0) == 2
    assert index.num_held_blocks("r") == 2  # the tie-break counts confirmed blocks, never guesses
    assert index.num_held_blocks("unknown") == 0


def test_salted_prompts_never_match_other_tenants() -> None:
    """Catches a router sending a tenant to blocks it can never reuse (the engine salts hashes)."""
    index = PrefixIndex(B, 5.0)
    b = builder()
    b.add_events([stored(HASHES), stored(HASHES, "swa")])
    index.apply_report("r", report(b), now=0.0)
    assert index.matched_blocks("r", block_hashes(PROMPT, B, salt="tenant-a"), len(PROMPT), now=0.0) == 0
    assert index.matched_blocks("r", block_hashes(PROMPT, B), len(PROMPT), now=0.0) == 5


def test_other_block_size_and_vanished_replicas_give_no_credit() -> None:
    """Catches matching hashes of a different block size, or routing to a removed replica's view."""
    index = PrefixIndex(B, 5.0)
    other = ReplicaReportBuilder(block_size=8, window=64, epoch="x")
    other.add_events([stored(HASHES), stored(HASHES, "swa")])
    index.apply_report("r8", other.build(0, 0, 0.0), now=0.0)
    assert index.matched_blocks("r8", HASHES, len(PROMPT), now=0.0) == 0
    b = builder()
    b.add_events([stored(HASHES), stored(HASHES, "swa")])
    index.apply_report("r", report(b), now=0.0)
    index.retain(["r"])
    assert index.replica_ids == ["r"]
    index.retain([])
    assert index.replica_ids == [] and index.matched_blocks("r", HASHES, len(PROMPT), now=0.0) == 0


def test_chunked_hashing_equals_the_engine_hashes_and_yields() -> None:
    """Catches chunk seams that break the hash chain or drop the salt, and a loop-blocking hash."""
    tokens = list(range(1000, 1000 + 4 * 50 + 3))
    yields = 0

    async def count_yields() -> None:
        nonlocal yields
        while True:
            await asyncio.sleep(0)
            yields += 1

    async def run() -> list[int]:
        counter = asyncio.create_task(count_yields())
        await asyncio.sleep(0)
        hashes = await hash_prompt_blocks(tokens, B, "s", max_blocks=1000, chunk_blocks=7)
        counter.cancel()
        return hashes

    assert asyncio.run(run()) == block_hashes(tokens, B, "s")
    assert yields >= 7  # 50 blocks in chunks of 7: 7 yields between 8 chunks
    capped = asyncio.run(hash_prompt_blocks(tokens, B, None, max_blocks=9, chunk_blocks=4))
    assert capped == block_hashes(tokens, B)[:9]


def test_eviction_aware_match_drops_the_least_recently_freed_blocks() -> None:
    """Catches an eviction-aware view that discounts recently used blocks (a prompt just freed by
    a finished request), ignores the replica's measured eviction rate, or discounts guesses."""
    clock = [0.0]
    b = ReplicaReportBuilder(block_size=B, window=0, epoch="e1", clock=lambda: clock[0])
    old, new = block_hashes(list(range(500, 513)), B), block_hashes(list(range(600, 613)), B)  # 3 blocks each
    b.add_events([stored(old), stored(new), stored([1, 2, 3, 4])])
    index = PrefixIndex(B, guess_ttl_s=5.0)
    index.apply_report("r", report(b), now=0.0)
    clock[0] = 2.0
    b.add_events([removed([1, 2, 3, 4])])  # 4 blocks in 2 s
    index.apply_report("r", report(b), now=2.0)
    assert index.evictions_per_s("r") == 0.3 * 4 / 2  # smoothed from 0 (EVICTION_RATE_WEIGHT)
    assert index.matched_blocks("r", old, 13, now=2.0, num_evicted=3) == 0  # the 3 oldest: all of old
    assert index.matched_blocks("r", new, 13, now=2.0, num_evicted=3) == 3
    assert index.matched_blocks("r", old, 13, now=2.0, num_evicted=0) == 3
    index.note_freed("r", old)  # a request using them just finished: now the newest
    assert index.matched_blocks("r", old, 13, now=3.0, num_evicted=3) == 3
    assert index.matched_blocks("r", new, 13, now=3.0, num_evicted=3) == 0
    index.note_routed("r", new, now=3.0)
    index.note_freed("r", old)
    assert index.matched_blocks("r", new, 13, now=4.0, num_evicted=6) == 3  # guessed: still held


def test_a_snapshot_keeps_the_known_blocks_order_and_puts_new_ones_last() -> None:
    """Catches a snapshot reload that forgets every block's last use (all would look equally old
    and the first eviction estimate would wipe the whole view)."""
    b = builder(window=0, config=ReportConfig(retain_reports=1, snapshot_every=1))
    first, second = HASHES[:2], block_hashes(list(range(700, 709)), B)
    b.add_events([stored(first)])
    index = PrefixIndex(B, guess_ttl_s=0.0)
    index.apply_report("r", report(b), now=0.0)
    b.add_events([stored(second)])
    report(b)  # a report this router missed: its events leave the one-report log
    b.add_events([stored([77])])
    latest = report(b)
    assert latest.snapshot is not None and latest.log_start > 2
    index.apply_report("r", latest, now=5.0)
    assert index.matched_blocks("r", [*first, 0], 9, now=5.0, num_evicted=2) == 0
    assert index.matched_blocks("r", second, 9, now=5.0, num_evicted=2) == 2
