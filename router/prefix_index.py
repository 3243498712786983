"""A router's view of which replica holds which prefix blocks, fed by the replicas' reports.

Each replica's view replays its numbered event log from a cursor (or reloads a snapshot after a
gap or a new epoch), so every router that has seen the same log position holds the same sets. A
match follows the engine's own lookup rule: every GA block of the prefix, plus the SWA blocks of
the window before its end, capped so one prompt token is always left to compute. Requests just
routed add short-lived guesses until the replica's events confirm or evict them.

Eviction-aware: a view also keeps its GA blocks in the order of their last known use (stored, sent
in a prompt, or freed by a finished request: the replica's LRU order, as far as a router can tell)
and the replica's eviction rate (removed blocks per second between consecutive reports). A caller
that passes `num_evicted` (that rate times the report's age) has that many of the least recently
used blocks count as gone.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from protocol.report import ReplicaReport

EVICTION_RATE_WEIGHT = 0.3  # of the newest report interval in a replica's smoothed eviction rate


@dataclass(frozen=True)
class ViewState:
    """What a router knows about one replica (compared across routers to prove convergence)."""

    epoch: str | None
    cursor: int | None  # last event seq applied; None: waiting for a snapshot
    full: frozenset[int]
    swa: frozenset[int]


@dataclass
class _View:
    epoch: str | None = None
    cursor: int | None = None
    full: set[int] = field(default_factory=set)
    swa: set[int] = field(default_factory=set)
    report: ReplicaReport | None = None
    received_at: float = float("-inf")  # local time the current report was first seen
    is_compatible: bool = True  # the replica hashes with our block size
    guesses: OrderedDict[int, float] = field(default_factory=OrderedDict)  # hash -> expiry time
    lru: OrderedDict[int, int] = field(default_factory=OrderedDict)  # GA hash -> use number; oldest first
    num_uses: int = 0
    evictions_per_s: float = 0.0  # GA blocks removed per second, smoothed over reports

    def reset(self, epoch: str) -> None:
        self.epoch, self.cursor = epoch, 0  # a fresh epoch starts empty at seq 0
        self.full.clear()
        self.swa.clear()
        self.guesses.clear()
        self.lru.clear()
        self.evictions_per_s = 0.0

    def use(self, block_hash: int) -> None:
        self.num_uses += 1
        self.lru[block_hash] = self.num_uses
        self.lru.move_to_end(block_hash)


@dataclass(frozen=True)
class ReplicaLoad:
    num_running: int
    num_waiting: int
    kv_usage: float
    report_age_s: float  # since the router received it (monotonic)
    recorded_at: float  # when the replica took it (its wall clock)
    step_s: float | None = None  # the replica's measured rates (None: not reported)
    prefill_tokens_per_s: float | None = None


class PrefixIndex:
    """Per-replica views keyed by replica id; time is passed in (monotonic seconds) for exact tests."""

    def __init__(self, block_size: int, guess_ttl_s: float) -> None:
        if block_size < 1 or guess_ttl_s < 0:
            raise ValueError(f"block_size must be >= 1 and guess_ttl_s >= 0, got {block_size}, {guess_ttl_s}")
        self.block_size = block_size
        self.guess_ttl_s = guess_ttl_s
        self._views: dict[str, _View] = {}

    @property
    def replica_ids(self) -> list[str]:
        return sorted(self._views)

    def apply_report(self, replica_id: str, report: ReplicaReport | None, now: float) -> bool:
        """Bring the view up to `report` (None: the replica has none yet); True if it was new."""
        view = self._views.setdefault(replica_id, _View())
        if report is None:
            return False
        last = view.report
        if last is not None and last.epoch == report.epoch and last.report_seq >= report.report_seq:
            return False  # seen already (or delivered out of order)
        is_next = last is not None and last.epoch == report.epoch
        view.report, view.received_at = report, now
        view.is_compatible = report.block_size == self.block_size
        if report.epoch != view.epoch:
            view.reset(report.epoch)
        num_removed = self._catch_up(view, report)
        if is_next and num_removed is not None and last is not None:
            elapsed_s = report.recorded_at - last.recorded_at
            if elapsed_s > 0:
                view.evictions_per_s += EVICTION_RATE_WEIGHT * (
                    num_removed / elapsed_s - view.evictions_per_s
                )
        self._expire_guesses(view, now)
        return True

    def _catch_up(self, view: _View, report: ReplicaReport) -> int | None:
        """Applies the report's new events; returns the GA blocks they removed (None: reloaded
        from a snapshot, so that count is unknown)."""
        cursor = view.cursor
        num_removed: int | None = 0
        if cursor is None or cursor + 1 < report.log_start or cursor > report.log_end:
            num_removed = None
            snapshot = report.snapshot
            if snapshot is None:  # behind the retained log: no prefix info until a snapshot
                view.cursor = None
                view.full.clear()
                view.swa.clear()
                view.lru.clear()
                return None
            view.full, view.swa = snapshot.decode()
            # blocks known before keep their order; the others were stored since: used last
            known = OrderedDict((h, n) for h, n in view.lru.items() if h in view.full)
            view.lru = known
            for block_hash in view.full - known.keys():
                view.use(block_hash)
            view.cursor = snapshot.seq
            cursor = snapshot.seq
        for event in report.events:
            if event.seq <= cursor:
                continue
            is_full = event.pool == "full"
            held = view.full if is_full else view.swa
            if event.kind == "stored":
                held.update(event.hashes)
                if is_full:
                    for block_hash in event.hashes:
                        view.use(block_hash)
            else:
                held.difference_update(event.hashes)
                if is_full:
                    for block_hash in event.hashes:
                        view.lru.pop(block_hash, None)
                    if num_removed is not None:
                        num_removed += len(event.hashes)
            for block_hash in event.hashes:  # confirmed or evicted: the truth replaces the guess
                view.guesses.pop(block_hash, None)
        view.cursor = max(cursor, report.log_end)
        return num_removed

    def note_routed(self, replica_id: str, block_hashes: Sequence[int], now: float) -> None:
        """Guess that `replica_id` will hold these blocks soon (it was just sent the prompt)."""
        view = self._views.setdefault(replica_id, _View())
        expiry = now + self.guess_ttl_s
        for block_hash in block_hashes:
            view.guesses[block_hash] = expiry
            view.guesses.move_to_end(block_hash)
            if block_hash in view.lru:  # the replica will use it again: no longer least recent
                view.use(block_hash)

    def note_freed(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """A request using these blocks finished: the replica frees them now (its LRU restarts)."""
        view = self._views.get(replica_id)
        if view is not None:
            for block_hash in block_hashes:
                if block_hash in view.lru:
                    view.use(block_hash)

    def drop_guesses(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """Undo `note_routed` (the request went elsewhere)."""
        view = self._views.get(replica_id)
        if view is not None:
            for block_hash in block_hashes:
                view.guesses.pop(block_hash, None)

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas that are gone (scaled down, died)."""
        keep = set(replica_ids)
        for replica_id in [r for r in self._views if r not in keep]:
            del self._views[replica_id]

    def matched_blocks(
        self, replica_id: str, block_hashes: Sequence[int], num_tokens: int, now: float, num_evicted: int = 0
    ) -> int:
        """Leading blocks of the prompt the replica would take from its cache (its engine's rule),
        with its `num_evicted` least recently used GA blocks counted as gone (guesses excepted)."""
        view = self._views.get(replica_id)
        if view is None or not view.is_compatible or num_tokens < 1:
            return 0
        guesses = view.guesses

        def held(pool: set[int], block_hash: int) -> bool:
            return block_hash in pool or guesses.get(block_hash, float("-inf")) > now

        last_evicted = self._last_evicted_use(view, num_evicted)

        def held_full(block_hash: int) -> bool:
            if guesses.get(block_hash, float("-inf")) > now:
                return True
            return block_hash in view.full and view.lru.get(block_hash, 0) > last_evicted

        max_blocks = min(len(block_hashes), (num_tokens - 1) // self.block_size)
        num_blocks = 0
        while num_blocks < max_blocks and held_full(block_hashes[num_blocks]):
            num_blocks += 1
        window = view.report.window if view.report is not None else 0  # no report: guesses only
        while num_blocks > 0:  # right to left: the window before the hit's end must be in SWA
            first_live = max(0, num_blocks * self.block_size - window) // self.block_size
            missing = next(
                (j for j in range(num_blocks - 1, first_live - 1, -1) if not held(view.swa, block_hashes[j])),
                None,
            )
            if missing is None:
                return num_blocks
            num_blocks = missing
        return 0

    @staticmethod
    def _last_evicted_use(view: _View, num_evicted: int) -> int:
        """The use number of the `num_evicted`-th least recently used GA block (-1: none evicted)."""
        if num_evicted <= 0 or not view.lru:
            return -1
        if num_evicted >= len(view.lru):
            return view.num_uses
        return next(itertools.islice(view.lru.values(), num_evicted - 1, None))

    def evictions_per_s(self, replica_id: str) -> float:
        """GA blocks the replica evicted per second, smoothed over its reports."""
        view = self._views.get(replica_id)
        return 0.0 if view is None else view.evictions_per_s

    def load(self, replica_id: str, now: float) -> ReplicaLoad | None:
        view = self._views.get(replica_id)
        if view is None or view.report is None:
            return None
        report = view.report
        return ReplicaLoad(
            report.num_running,
            report.num_waiting,
            report.kv_usage,
            now - view.received_at,
            report.recorded_at,
            report.step_s,
            report.prefill_tokens_per_s,
        )

    def has_prefix_view(self, replica_id: str) -> bool:
        """The replica's block sets are usable (synced to its log, same block size)."""
        view = self._views.get(replica_id)
        return view is not None and view.report is not None and view.is_compatible and view.cursor is not None

    def num_held_blocks(self, replica_id: str) -> int:
        """GA blocks the replica's events say it holds (no guesses: every router agrees on it)."""
        view = self._views.get(replica_id)
        return 0 if view is None else len(view.full)

    def view_state(self, replica_id: str) -> ViewState:
        view = self._views.get(replica_id, _View())
        return ViewState(view.epoch, view.cursor, frozenset(view.full), frozenset(view.swa))

    def num_guesses(self, replica_id: str, now: float) -> int:
        view = self._views.get(replica_id)
        return 0 if view is None else sum(expiry > now for expiry in view.guesses.values())

    @staticmethod
    def _expire_guesses(view: _View, now: float) -> None:
        guesses = view.guesses  # expiry grows with insertion order (move_to_end on refresh)
        while guesses and next(iter(guesses.values())) <= now:
            guesses.popitem(last=False)
