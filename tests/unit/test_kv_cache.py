"""Block pool, layout planning and the hybrid KV cache manager, with exact block ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.block_hash import block_hashes
from replicas.engine.block_pool import BlockPool, KVEvent, PoolUsage
from replicas.engine.kv_cache import KVCacheManager
from replicas.engine.kv_layout import KVLayout, plan_layout, swa_blocks_per_seq

B = 4  # block size of every manager test
W = 4  # window: a query at p sees keys [p - 4, p]


def manager(num_full: int = 8, num_swa: int = 6, window: int = W) -> KVCacheManager:
    return KVCacheManager(KVLayout(B, num_full, num_swa, window))


def run_prompt(kv: KVCacheManager, seq_id: str, tokens: list[int], salt: str | None = None) -> list[int]:
    """Compute `tokens` in one chunk, commit them and return their block hashes."""
    hashes = block_hashes(tokens, B, salt)
    assert kv.allocate(seq_id, 0, len(tokens), block_hashes=hashes)
    kv.commit(seq_id, hashes, len(tokens))
    return hashes


# --- BlockPool -------------------------------------------------------------------------------


def test_pool_allocates_from_head_and_never_partially() -> None:
    """Catches a partial allocation left behind when the pool is short."""
    pool = BlockPool(4, "full")
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None
    assert pool.usage() == PoolUsage(num_used=3, num_cached_free=0, num_free=1, num_total=4)
    pool.check_invariants([1, 1, 1, 0])


def test_pool_lru_evicts_the_tail_freed_first_and_emits_removed() -> None:
    """Catches eviction of the wrong end of a freed sequence, or evictions the router never hears of."""
    pool = BlockPool(4, "full")
    blocks = pool.allocate(4)
    assert blocks is not None
    for block, block_hash in zip(blocks, [10, 11, 12, 13], strict=True):
        assert pool.cache(block, block_hash)
    pool.free(blocks[::-1])  # queue: 3, 2, 1, 0
    assert pool.usage() == PoolUsage(0, 4, 4, 4)
    assert pool.allocate(1) == [3]
    assert pool.cached_block(13) is None and pool.cached_block(10) == 0
    assert pool.drain_events() == [
        KVEvent("stored", (10, 11, 12, 13), "full"),
        KVEvent("removed", (13,), "full"),
    ]
    assert pool.drain_events() == []


def test_pool_reuses_uncached_blocks_before_cached_ones() -> None:
    """Catches throwing away a reusable prefix while worthless uncached blocks sit free."""
    pool = BlockPool(4, "swa")
    blocks = pool.allocate(4)
    assert blocks is not None
    pool.cache(0, 20)
    pool.cache(1, 21)
    pool.free(blocks[::-1])  # uncached 3 then 2 go to the head: queue 2, 3, 1, 0
    assert pool.allocate(2) == [2, 3]
    assert pool.drain_events() == [KVEvent("stored", (20, 21), "swa")]


def test_pool_touch_takes_a_free_cached_block_back() -> None:
    """Catches a prefix hit on a free block that stays in the free queue and gets handed out twice."""
    pool = BlockPool(2, "full")
    blocks = pool.allocate(2)
    assert blocks == [0, 1]
    pool.cache(0, 7)
    pool.free([1, 0])
    pool.touch([0])
    assert pool.usage() == PoolUsage(1, 0, 1, 2)
    assert pool.allocate(2) is None
    assert pool.allocate(1) == [1]
    pool.check_invariants([1, 1])


def test_pool_duplicate_hash_keeps_the_first_block() -> None:
    """Catches two blocks registered under one hash, which leaves a dangling map entry on eviction."""
    pool = BlockPool(2, "full")
    assert pool.allocate(2) == [0, 1]
    assert pool.cache(0, 5)
    assert not pool.cache(1, 5)
    assert pool.cached_block(5) == 0 and pool.block_hash(1) is None


def test_pool_invariant_check_detects_drift() -> None:
    """Catches a checker that passes everything (so the property tests would prove nothing)."""
    pool = BlockPool(2, "full")
    pool.allocate(1)
    with pytest.raises(AssertionError):
        pool.check_invariants([0, 0])


# --- Layout ----------------------------------------------------------------------------------


def test_swa_blocks_per_seq_is_the_worst_alignment() -> None:
    """Catches an SWA budget that forgets the chunk itself or the unaligned extra block."""
    assert swa_blocks_per_seq(window=4, block_size=4, num_step_positions=1) == 2  # 5 positions: 3..7
    assert swa_blocks_per_seq(window=4, block_size=4, num_step_positions=2) == 3  # 6 positions: 3..8
    assert swa_blocks_per_seq(window=0, block_size=4, num_step_positions=1) == 1
    assert swa_blocks_per_seq(window=128, block_size=16, num_step_positions=8) == 10


def test_plan_layout_exact_split() -> None:
    """Catches SWA sized per token instead of per window, or the half-budget cap not applied."""
    layout = plan_layout(
        budget_bytes=10_000,
        full_bytes_per_block=10,
        swa_bytes_per_block=20,
        block_size=4,
        window=8,
        max_running=2,
        max_step_tokens=8,
        max_model_len=64,
        num_lookahead_tokens=1,
    )
    # running bound: (2 * (8 + 8 - 2) + 8 + 2 * 1) // 4 = 9 blocks, times 2 spare = 18
    assert layout == KVLayout(
        block_size=4, num_full_blocks=(10_000 - 18 * 20) // 10, num_swa_blocks=18, window=8
    )
    capped = plan_layout(
        budget_bytes=1_000,
        full_bytes_per_block=10,
        swa_bytes_per_block=20,
        block_size=4,
        window=8,
        max_running=8,
        max_step_tokens=8,
        max_model_len=16,
    )
    assert capped.num_swa_blocks == 25 and capped.num_full_blocks == 50


def test_plan_layout_errors_name_the_field() -> None:
    """Catches a budget too small for one sequence being accepted and failing later at runtime."""
    common = dict(full_bytes_per_block=10, swa_bytes_per_block=10, block_size=4, window=8, max_running=1)
    with pytest.raises(ValueError, match="num_swa_blocks"):
        plan_layout(budget_bytes=60, max_step_tokens=8, max_model_len=8, **common)
    with pytest.raises(ValueError, match="num_full_blocks"):
        plan_layout(budget_bytes=400, max_step_tokens=8, max_model_len=1000, **common)
    with pytest.raises(ValueError, match="block_size"):
        KVLayout(0, 1, 1, 0)


# --- KVCacheManager --------------------------------------------------------------------------


def test_first_live_block_boundary() -> None:
    """Catches an off-by-one in the SWA release rule (a query at p sees keys p - window .. p)."""
    kv = manager()
    assert kv.first_live_block(7) == 0  # query at 7 sees 3..7: block 0 holds 3
    assert kv.first_live_block(8) == 1  # query at 8 sees 4..8: block 0 (0..3) is dead
    assert kv.first_live_block(11) == 1
    assert kv.first_live_block(12) == 2


def test_allocate_exact_tables_and_swa_release() -> None:
    """Catches SWA blocks kept past the window, or released one step too early."""
    kv = manager()
    assert kv.allocate("a", 0, 8)
    assert kv.block_tables("a") == ([0, 1], [0, 1])
    assert kv.allocate("a", 7, 1)  # query at 7 still sees position 3
    assert kv.block_tables("a") == ([0, 1], [0, 1])
    assert kv.allocate("a", 8, 1)  # query at 8 sees 4..8: block 0 goes, uncached so reused at once
    assert kv.block_tables("a") == ([0, 1, 2], [None, 1, 0])
    kv.check_invariants()


def test_release_counts_toward_capacity() -> None:
    """Catches a sequence failing to grow when the blocks it needs are its own dead SWA blocks."""
    kv = manager(num_swa=3)
    assert kv.allocate("a", 0, 12)
    assert kv.allocate("a", 12, 1)  # releases blocks 0 and 1, takes one back
    assert kv.block_tables("a") == ([0, 1, 2, 3], [None, None, 2, 1])
    kv.check_invariants()


def test_failed_allocate_changes_nothing() -> None:
    """Catches half-done allocations (GA grown but SWA not, or SWA released) on failure."""
    kv = manager(num_full=3, num_swa=6)
    assert kv.allocate("a", 0, 8)
    assert kv.allocate("b", 0, 4)
    before = (kv.block_tables("a"), kv.usage())
    assert not kv.allocate("a", 12, 4)  # would release SWA block 0 and need 2 new GA blocks
    assert (kv.block_tables("a"), kv.usage()) == before
    assert not kv.allocate("c", 0, 8)
    assert not kv.has_seq("c")
    kv.check_invariants()


def test_lookahead_slots_are_covered() -> None:
    """Catches MTP draft slots past the fed tokens left without a block."""
    kv = manager()
    assert kv.allocate("a", 0, 7, num_lookahead_tokens=2)  # positions 0..8
    assert kv.block_tables("a") == ([0, 1, 2], [0, 1, 2])


def test_prefix_hit_shares_blocks_and_keeps_one_token_to_compute() -> None:
    """Catches a hit that copies blocks, covers the whole prompt, or skips the SWA window check."""
    kv = manager()
    tokens = list(range(100, 112))
    hashes = run_prompt(kv, "a", tokens)
    kv.free("a")
    assert kv.lookup(hashes, len(tokens)) == 8  # never all 12: the last token must be computed
    assert kv.lookup(block_hashes([*tokens, 7], B), 13) == 12
    assert kv.allocate("b", 8, 4, block_hashes=hashes)
    assert kv.block_tables("b") == ([0, 1, 3], [None, 1, 3])  # GA 0, 1 and SWA 1 shared, not copied
    assert kv.usage()["full"] == PoolUsage(num_used=3, num_cached_free=1, num_free=5, num_total=8)
    kv.check_invariants()


def test_hit_needs_the_swa_window_and_scans_down() -> None:
    """Catches a GA-only hit whose first query would read SWA keys that were evicted."""
    kv = manager(num_full=8, num_swa=6)
    tokens = list(range(16))
    hashes = run_prompt(kv, "a", tokens)
    kv.free("a")  # SWA queue: 4, 5, then logical blocks 3, 2, 1, 0 (tail first)
    assert kv.lookup(block_hashes([*tokens, 0], B), 17) == 16
    assert kv.allocate("other", 0, 12)  # SWA takes 4, 5 and evicts logical block 3
    assert kv.drain_events()[-1] == KVEvent("removed", (hashes[3],), "swa")
    assert kv.lookup(block_hashes([*tokens, 0], B), 17) == 12  # window before 12 is block 2: still cached
    kv.check_invariants()


def test_hit_limited_by_ga_tail_eviction() -> None:
    """Catches a hit that trusts SWA blocks while GA lost a block in the middle of the prefix."""
    kv = manager(num_full=5, num_swa=8)
    tokens = list(range(16))
    hashes = run_prompt(kv, "a", tokens)
    kv.free("a")  # GA queue: 4, then logical 3, 2, 1, 0
    assert kv.allocate("other", 0, 8)  # GA takes 4 and evicts logical block 3
    assert kv.lookup(block_hashes([*tokens, 0], B), 17) == 12
    assert kv.lookup(hashes, 16) == 12


def test_salt_isolates_tenants() -> None:
    """Catches one tenant's cached prefix being served to another tenant."""
    kv = manager()
    tokens = list(range(12))
    run_prompt(kv, "a", tokens, salt="tenant-a")
    kv.free("a")
    assert kv.lookup(block_hashes(tokens, B, "tenant-b"), 12) == 0
    assert kv.lookup(block_hashes(tokens, B, "tenant-a"), 12) == 8


def test_hit_blocks_are_not_counted_as_free_for_the_same_allocation() -> None:
    """Catches allocate() evicting (and handing out again) the very free blocks a hit is sharing."""
    kv = manager(num_full=4, num_swa=4, window=0)
    tokens = list(range(8))
    hashes = run_prompt(kv, "a", tokens)
    kv.free("a")
    assert kv.allocate("c", 0, 8)  # takes GA 2, 3: the only free GA blocks left are the hit's 1, 0
    assert kv.lookup(block_hashes([*tokens, 9], B), 9) == 8
    assert not kv.allocate("b", 8, 1, block_hashes=hashes)
    assert kv.full_pool.cached_block(hashes[1]) == 1
    kv.free("c")
    assert kv.allocate("b", 8, 1, block_hashes=hashes)
    assert kv.block_tables("b") == ([0, 1, 2], [None, None, 2])  # window 0: no SWA block to share
    kv.check_invariants()


def test_commit_registers_only_full_final_blocks_and_not_released_swa() -> None:
    """Catches caching a partial block, draft slots, or an SWA block that was already released."""
    kv = manager()
    tokens = list(range(16))
    hashes = block_hashes(tokens, B)
    assert kv.allocate("a", 0, 10, num_lookahead_tokens=2)
    kv.commit("a", hashes, 10)
    assert kv.drain_events() == [
        KVEvent("stored", tuple(hashes[:2]), "full"),
        KVEvent("stored", tuple(hashes[:2]), "swa"),
    ]
    assert kv.allocate("a", 14, 2)  # (ran 10..13 uncommitted) releases SWA blocks 0, 1 ... hold 2, 3
    kv.commit("a", hashes, 16)
    assert kv.drain_events() == [
        KVEvent("stored", tuple(hashes[2:]), "full"),
        KVEvent("stored", tuple(hashes[2:]), "swa"),
    ]
    kv.check_invariants()


def test_rollback_frees_draft_blocks_tail_first() -> None:
    """Catches rollback leaking the blocks it drops or dropping blocks still holding final tokens."""
    kv = manager()
    assert kv.allocate("a", 0, 5, num_lookahead_tokens=4)  # positions 0..8: 3 blocks
    kv.rollback("a", 5)
    assert kv.block_tables("a") == ([0, 1], [0, 1])
    assert kv.usage()["full"].num_used == 2
    kv.check_invariants()


def test_free_releases_everything_and_unknown_is_noop() -> None:
    """Catches leaked blocks after a sequence ends, or a crash when aborting a never-run request."""
    kv = manager()
    run_prompt(kv, "a", list(range(10)))
    kv.free("a")
    kv.free("never")
    assert kv.usage() == {"full": PoolUsage(0, 2, 8, 8), "swa": PoolUsage(0, 2, 6, 6)}
    kv.check_invariants()


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 6), st.integers(0, 2), st.booleans()), max_size=40
    ),
    window=st.integers(0, 9),
)
def test_random_growth_keeps_invariants_and_bounded_swa(
    ops: list[tuple[int, int, int, bool]], window: int
) -> None:
    """Catches ref-count drift, double frees and SWA tables growing past what the window needs."""
    kv = manager(num_full=12, num_swa=10, window=window)
    computed: dict[str, int] = {}
    widest: dict[str, int] = {}  # most positions one step of the sequence has written (tokens + lookahead)
    for seq_index, num_new, lookahead, finish in ops:
        seq_id = f"s{seq_index}"
        tokens = [seq_index % 2] * 64  # two sequences share every prefix
        hashes = block_hashes(tokens, B)
        if seq_id not in computed:
            computed[seq_id] = kv.lookup(hashes, 60)
            widest.pop(seq_id, None)
        if kv.allocate(seq_id, computed[seq_id], num_new, lookahead, hashes):
            # blocks an earlier, wider step allocated ahead (draft lookahead) stay for the positions
            # they cover: the bound is the window plus the widest step, as `plan_layout` sizes it
            widest[seq_id] = max(widest.get(seq_id, 0), num_new + lookahead)
            held = [b for b in kv.block_tables(seq_id)[1] if b is not None]
            assert len(held) <= swa_blocks_per_seq(window, B, widest[seq_id])
            computed[seq_id] = min(60, computed[seq_id] + num_new)
            kv.commit(seq_id, hashes, computed[seq_id])
        elif not kv.has_seq(seq_id):
            del computed[seq_id]
        if finish and kv.has_seq(seq_id):
            kv.free(seq_id)
            del computed[seq_id]
        kv.check_invariants()
    for seq_id in list(computed):
        kv.free(seq_id)
    kv.check_invariants()
    assert kv.usage()["full"].num_used == 0 and kv.usage()["swa"].num_used == 0
