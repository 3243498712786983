"""One pool of physical KV blocks: ref counts, block hashes and an LRU free queue, all O(1).

A freed block keeps its hash and stays in the free queue, so a later request with the same prefix
can take it back (`touch`) until allocation reaches it at the queue head and evicts its hash.
Stored/removed hash events are buffered for the router's prefix index.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PoolName = Literal["full", "swa"]
EventKind = Literal["stored", "removed"]


@dataclass(frozen=True)
class KVEvent:
    kind: EventKind  # "stored": hashes became hits; "removed": evicted, no longer hits
    block_hashes: tuple[int, ...]  # in the order they happened
    pool: PoolName  # "full" (GA layers, what the router indexes) or "swa"


@dataclass(frozen=True)
class PoolUsage:
    num_used: int  # blocks referenced by at least one sequence
    num_cached_free: int  # unreferenced blocks still holding a reusable prefix (subset of num_free)
    num_free: int  # allocatable blocks: num_total - num_used
    num_total: int

    @property
    def used_fraction(self) -> float:
        return self.num_used / self.num_total


class BlockPool:
    """Blocks 0..num_blocks-1; the free queue runs from the head (evicted next) to the tail."""

    def __init__(self, num_blocks: int, name: PoolName) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.name: PoolName = name
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._hashes: list[int | None] = [None] * num_blocks
        self._block_of_hash: dict[int, int] = {}
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._num_cached_free = 0
        self._pending_events: list[tuple[EventKind, int]] = []

    @property
    def num_free(self) -> int:
        return len(self._free_queue)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def block_hash(self, block: int) -> int | None:
        return self._hashes[block]

    def cached_block(self, block_hash: int) -> int | None:
        """The block holding `block_hash`, in use or free, or None."""
        return self._block_of_hash.get(block_hash)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """`num_blocks` blocks from the queue head with ref 1, or None (and no change) if too few."""
        if num_blocks > len(self._free_queue):
            return None
        blocks = []
        for _ in range(num_blocks):
            block, _ = self._free_queue.popitem(last=False)
            evicted_hash = self._hashes[block]
            if evicted_hash is not None:
                self._hashes[block] = None
                del self._block_of_hash[evicted_hash]
                self._num_cached_free -= 1
                self._pending_events.append(("removed", evicted_hash))
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference each, in order; a block reaching 0 joins the free queue.

        Cached blocks go to the tail (kept longest, so callers free a sequence tail-first);
        uncached ones go to the head, since reusing them first loses no prefix.
        """
        for block in blocks:
            assert self._ref_counts[block] > 0, f"{self.name} block {block} freed twice"
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free_queue[block] = None
                if self._hashes[block] is None:
                    self._free_queue.move_to_end(block, last=False)
                else:
                    self._num_cached_free += 1

    def touch(self, blocks: Sequence[int]) -> None:
        """Take one more reference on each block (a prefix hit), out of the free queue if there."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._free_queue[block]
                if self._hashes[block] is not None:
                    self._num_cached_free -= 1
            self._ref_counts[block] += 1

    def cache(self, block: int, block_hash: int) -> bool:
        """Register a full, final, in-use block under `block_hash`; False if the hash is taken."""
        assert self._ref_counts[block] > 0, f"{self.name} block {block} cached while free"
        assert self._hashes[block] is None, f"{self.name} block {block} cached twice"
        if block_hash in self._block_of_hash:
            return False  # same prefix computed twice concurrently: the first copy stays the hit
        self._hashes[block] = block_hash
        self._block_of_hash[block_hash] = block
        self._pending_events.append(("stored", block_hash))
        return True

    def usage(self) -> PoolUsage:
        num_free = len(self._free_queue)
        return PoolUsage(self.num_blocks - num_free, self._num_cached_free, num_free, self.num_blocks)

    def drain_events(self) -> list[KVEvent]:
        """Buffered events, consecutive ones of a kind merged, oldest first; clears the buffer."""
        events: list[KVEvent] = []
        run: list[int] = []
        for index, (kind, block_hash) in enumerate(self._pending_events):
            run.append(block_hash)
            is_run_end = index + 1 == len(self._pending_events) or self._pending_events[index + 1][0] != kind
            if is_run_end:
                events.append(KVEvent(kind, tuple(run), self.name))
                run = []
        self._pending_events.clear()
        return events

    def check_invariants(self, expected_ref_counts: Sequence[int]) -> None:
        """Ref counts equal what the block tables say; free queue = unreferenced blocks; hash map consistent."""
        assert list(expected_ref_counts) == self._ref_counts, f"{self.name} ref counts differ from tables"
        unreferenced = {b for b, refs in enumerate(self._ref_counts) if refs == 0}
        assert set(self._free_queue) == unreferenced, f"{self.name} free queue != unreferenced blocks"
        for block_hash, block in self._block_of_hash.items():
            assert self._hashes[block] == block_hash, f"{self.name} hash map points at the wrong block"
        assert sum(h is not None for h in self._hashes) == len(self._block_of_hash)
        num_cached_free = sum(self._hashes[b] is not None for b in self._free_queue)
        assert num_cached_free == self._num_cached_free, f"{self.name} cached-free count drifted"
