"""Hybrid paged KV cache manager: per-sequence block tables over a GA pool and an SWA pool.

GA layers keep every block; SWA (and MTP) layers drop the blocks no future query's window can
reach, so their memory per sequence stays bounded. Prefix caching keys full blocks by chained
hashes (`protocol.block_hash`); a hit must hold every GA block and the SWA blocks of the last window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from replicas.engine.block_pool import BlockPool, KVEvent, PoolName, PoolUsage
from replicas.engine.kv_layout import KVLayout


@dataclass
class _SeqBlocks:
    full: list[int]  # GA block table: logical block j -> physical block
    swa: list[int | None]  # SWA block table, same logical indexing; None once out of every window
    num_released_swa: int  # swa[:num_released_swa] are None, the rest are held
    num_committed_blocks: int  # leading blocks already registered in the prefix cache (or hit)


class KVCacheManager:
    """Block tables per sequence id; every mutation is all-or-nothing."""

    def __init__(self, layout: KVLayout, enable_prefix_cache: bool = True) -> None:
        self.layout = layout
        self.enable_prefix_cache = enable_prefix_cache
        self.full_pool = BlockPool(layout.num_full_blocks, "full")
        self.swa_pool = BlockPool(layout.num_swa_blocks, "swa")
        self._seqs: dict[str, _SeqBlocks] = {}

    def first_live_block(self, num_computed_tokens: int) -> int:
        """First logical block a query at position >= num_computed_tokens can see on SWA layers.

        A query at p sees keys [p - window, p]; the earliest future query is at num_computed_tokens,
        so block j (positions up to (j + 1) * B - 1) is dead iff (j + 1) * B <= num_computed - window.
        """
        return max(0, num_computed_tokens - self.layout.window) // self.layout.block_size

    def lookup(self, block_hashes: Sequence[int], num_tokens: int) -> int:
        """Prompt tokens (a multiple of block_size) that a new sequence can take from the cache.

        `block_hashes` are the full-block hashes of its `num_tokens` tokens. The hit of n blocks
        needs all n GA blocks and the SWA blocks the first computed query (at n * B) can see; at
        least one token is always left to compute, so n <= (num_tokens - 1) // B.
        """
        if not self.enable_prefix_cache or num_tokens < 1:
            return 0
        max_blocks = min(len(block_hashes), (num_tokens - 1) // self.layout.block_size)
        num_blocks = 0
        while num_blocks < max_blocks and self.full_pool.cached_block(block_hashes[num_blocks]) is not None:
            num_blocks += 1
        while num_blocks > 0:  # right to left: the window before n * B must be cached on SWA
            first = self.first_live_block(num_blocks * self.layout.block_size)
            missing = self._last_swa_miss(block_hashes, first, num_blocks)
            if missing is None:
                return num_blocks * self.layout.block_size
            num_blocks = missing  # any hit covering block `missing` in its window fails too
        return 0

    def _last_swa_miss(self, block_hashes: Sequence[int], start: int, end: int) -> int | None:
        """Highest j in [start, end) whose hash is not cached in the SWA pool, or None."""
        for j in range(end - 1, start - 1, -1):
            if self.swa_pool.cached_block(block_hashes[j]) is None:
                return j
        return None

    def allocate(
        self,
        seq_id: str,
        num_computed_tokens: int,
        num_new_tokens: int,
        num_lookahead_tokens: int = 0,
        block_hashes: Sequence[int] = (),
    ) -> bool:
        """Make both tables cover positions [0, num_computed + num_new + lookahead); False if it cannot.

        On a sequence's first call, num_computed_tokens > 0 means a prefix hit from `lookup` (same
        `block_hashes`): those blocks are shared, not copied. SWA blocks out of every future window
        are released. On False nothing changed at all.
        """
        block_size = self.layout.block_size
        num_blocks_needed = -(-(num_computed_tokens + num_new_tokens + num_lookahead_tokens) // block_size)
        first_live = self.first_live_block(num_computed_tokens)
        seq = self._seqs.get(seq_id)
        if seq is None:
            return self._allocate_new(seq_id, num_computed_tokens, num_blocks_needed, block_hashes)
        to_release = [b for b in seq.swa[seq.num_released_swa : first_live] if b is not None]
        num_swa_freed = sum(self.swa_pool.ref_count(b) == 1 for b in to_release)
        num_new_full = max(0, num_blocks_needed - len(seq.full))
        num_new_swa = max(0, num_blocks_needed - len(seq.swa))
        if num_new_full > self.full_pool.num_free or num_new_swa > self.swa_pool.num_free + num_swa_freed:
            return False
        self.swa_pool.free(to_release)  # oldest positions first: they are evicted first
        for j in range(seq.num_released_swa, max(first_live, seq.num_released_swa)):
            seq.swa[j] = None
        seq.num_released_swa = max(first_live, seq.num_released_swa)
        new_full = self.full_pool.allocate(num_new_full)
        new_swa = self.swa_pool.allocate(num_new_swa)
        assert new_full is not None and new_swa is not None
        seq.full.extend(new_full)
        seq.swa.extend(new_swa)
        return True

    def _allocate_new(
        self, seq_id: str, num_computed_tokens: int, num_blocks_needed: int, block_hashes: Sequence[int]
    ) -> bool:
        num_hit_blocks, remainder = divmod(num_computed_tokens, self.layout.block_size)
        assert remainder == 0 and num_hit_blocks <= len(block_hashes), "a hit is whole cached blocks"
        first_live = self.first_live_block(num_computed_tokens)
        hit_full = [self.full_pool.cached_block(h) for h in block_hashes[:num_hit_blocks]]
        hit_swa = [self.swa_pool.cached_block(h) for h in block_hashes[first_live:num_hit_blocks]]
        hit_full_blocks = [b for b in hit_full if b is not None]
        hit_swa_blocks = [b for b in hit_swa if b is not None]
        assert len(hit_full_blocks) == len(hit_full) and len(hit_swa_blocks) == len(hit_swa), "stale hit"
        # Hit blocks sitting in the free queue stop being allocatable once taken.
        num_full_reused = sum(self.full_pool.ref_count(b) == 0 for b in hit_full_blocks)
        num_swa_reused = sum(self.swa_pool.ref_count(b) == 0 for b in hit_swa_blocks)
        num_new = max(0, num_blocks_needed - num_hit_blocks)
        if (
            num_new + num_full_reused > self.full_pool.num_free
            or num_new + num_swa_reused > self.swa_pool.num_free
        ):
            return False
        self.full_pool.touch(hit_full_blocks)  # before allocating, so allocation cannot evict them
        self.swa_pool.touch(hit_swa_blocks)
        new_full = self.full_pool.allocate(num_new)
        new_swa = self.swa_pool.allocate(num_new)
        assert new_full is not None and new_swa is not None
        swa_table: list[int | None] = [None] * first_live
        swa_table.extend(hit_swa_blocks)
        swa_table.extend(new_swa)
        self._seqs[seq_id] = _SeqBlocks(hit_full_blocks + new_full, swa_table, first_live, num_hit_blocks)
        return True

    def commit(self, seq_id: str, block_hashes: Sequence[int], num_final_tokens: int) -> None:
        """Register every block that is now full of final tokens (KV written, no drafts) as a hit.

        `num_final_tokens` counts leading tokens whose KV is final; `block_hashes` covers at least
        num_final_tokens // block_size blocks. Released SWA blocks are not re-cached.
        """
        seq = self._seqs[seq_id]
        num_full_blocks = min(num_final_tokens // self.layout.block_size, len(seq.full))
        if not self.enable_prefix_cache or num_full_blocks <= seq.num_committed_blocks:
            return
        assert len(block_hashes) >= num_full_blocks, "block_hashes shorter than the final tokens"
        for j in range(seq.num_committed_blocks, num_full_blocks):
            self.full_pool.cache(seq.full[j], block_hashes[j])
            swa_block = seq.swa[j]
            if swa_block is not None:
                self.swa_pool.cache(swa_block, block_hashes[j])
        seq.num_committed_blocks = num_full_blocks

    def rollback(self, seq_id: str, num_tokens: int) -> None:
        """Free table entries wholly past position num_tokens - 1 (slots taken for rejected drafts).

        Optional: the scheduler keeps them, since the next step's drafts need them again.
        """
        seq = self._seqs[seq_id]
        num_blocks_kept = -(-num_tokens // self.layout.block_size)
        assert num_blocks_kept >= seq.num_committed_blocks, "rollback below committed tokens"
        dropped_full = seq.full[num_blocks_kept:]
        dropped_swa = seq.swa[max(num_blocks_kept, seq.num_released_swa) :]
        del seq.full[num_blocks_kept:]
        del seq.swa[max(num_blocks_kept, seq.num_released_swa) :]
        self.full_pool.free(dropped_full[::-1])
        self.swa_pool.free([b for b in dropped_swa[::-1] if b is not None])

    def free(self, seq_id: str) -> None:
        """Release both tables tail first (the tail is evicted first); unknown ids are a no-op."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        self.full_pool.free(seq.full[::-1])
        self.swa_pool.free([b for b in seq.swa[::-1] if b is not None])

    def has_seq(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def block_tables(self, seq_id: str) -> tuple[list[int], list[int | None]]:
        """Copies of (GA table, SWA table); position p lives in block p // B at offset p % B."""
        seq = self._seqs[seq_id]
        return list(seq.full), list(seq.swa)

    def usage(self) -> dict[PoolName, PoolUsage]:
        return {"full": self.full_pool.usage(), "swa": self.swa_pool.usage()}

    def drain_events(self) -> list[KVEvent]:
        """Stored/removed hash events since the last drain (GA pool first); the router reads "full"."""
        return self.full_pool.drain_events() + self.swa_pool.drain_events()

    def check_invariants(self) -> None:
        """Pools agree with the tables: ref counts, free queues, hash maps; SWA tables released in order."""
        full_refs = [0] * self.layout.num_full_blocks
        swa_refs = [0] * self.layout.num_swa_blocks
        for seq_id, seq in self._seqs.items():
            held_swa = [b for b in seq.swa if b is not None]
            assert len(seq.swa) == len(seq.full), f"{seq_id}: table lengths differ"
            assert len(set(seq.full)) == len(seq.full), f"{seq_id}: GA block twice in one table"
            assert len(set(held_swa)) == len(held_swa), f"{seq_id}: SWA block twice in one table"
            assert all(b is None for b in seq.swa[: seq.num_released_swa]), f"{seq_id}: released SWA held"
            assert all(b is not None for b in seq.swa[seq.num_released_swa :]), f"{seq_id}: SWA hole"
            assert seq.num_committed_blocks <= len(seq.full), f"{seq_id}: committed past the table"
            for block in seq.full:
                full_refs[block] += 1
            for block in held_swa:
                swa_refs[block] += 1
        self.full_pool.check_invariants(full_refs)
        self.swa_pool.check_invariants(swa_refs)
