"""How many requests each replica has, as one router can best tell between its reports.

A report's `num_running + num_waiting` is a snapshot taken at its `recorded_at` (the replica's
wall clock), which can be well before the router gets it: Serve's controller polls and pushes
reports on its own schedule, later still when it is busy. Taken at face value, such a report
keeps counting requests that have finished since. A burst right after a burst would then see every
replica still holding the first one and pile onto whichever replica reported last. So:

- load_source "handle" (requests complete through this router): the largest of three lower bounds:
  - the report, less this router's requests that were routed before it was taken and completed
    after (they were in it, and are gone now);
  - this router's in-flight count;
  - Serve's queue-length cache.
  With other gateways' routers sharing their in-flight counts (`router.peer_loads`, through the
  route board), the estimate is instead this router's in-flight count plus theirs (at least Serve's
  queue length): every request in flight, within the board's ~50 ms. The report is left out then,
  because it still counts the requests other routers saw finish since it was taken (with a
  1-second-old report that overcounted by several requests per replica and herded the gateways).
- load_source "reports" (requests are sent by someone else and never seen to end here): the report
  plus the requests routed there after it was taken.

Times are wall-clock seconds (`time.time()`) on both sides, so the router and replica clocks must
agree to within a request's lifetime (NTP does). Skew only shifts which requests count as in a
report: the in-flight count still bounds the estimate from below. Pure bookkeeping: the caller
says when requests are routed, moved, completed or dropped, and passes each fresh report's count
and time.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from router.policy import LoadSource
from router.recent_routes import RecentRoutes


class ReplicaLoads:
    def __init__(self, load_source: LoadSource, horizon_s: float) -> None:
        """`horizon_s`: how long routings and completions are remembered (the stale-report age:
        an older report is never passed in)."""
        self.load_source = load_source
        self.horizon_s = horizon_s
        self._in_flight: Counter[str] = Counter()  # routed here, not completed
        self._completed: dict[str, deque[tuple[float, float]]] = {}  # (routed_at, completed_at)
        self._recent = RecentRoutes(horizon_s)  # "reports": routings per replica

    def routed(self, replica_id: str, now: float) -> None:
        self._in_flight[replica_id] += 1
        if self.load_source == "reports":
            self._recent.note(replica_id, now)

    def moved(self, from_id: str, to_id: str) -> None:
        """Serve sent a request routed to `from_id` to `to_id` instead."""
        self._release(from_id)
        self._in_flight[to_id] += 1

    def completed(self, replica_id: str, routed_at: float, now: float) -> None:
        """A request routed at `routed_at` finished on the replica at `now` (whatever its outcome)."""
        self._release(replica_id)
        done = self._completed.setdefault(replica_id, deque())
        done.append((routed_at, now))
        while done[0][1] < now - self.horizon_s:
            done.popleft()

    def dropped(self, replica_id: str) -> None:
        """A routed request that never ran there (cancelled before it was sent, or forgotten)."""
        self._release(replica_id)

    def num_requests(
        self,
        replica_id: str,
        reported: int | None,
        recorded_at: float,
        queue_len: int,
        now: float,
        peers: int | None = None,
    ) -> int:
        """Best estimate of running + waiting + in flight. `reported` is the fresh report's count,
        taken at `recorded_at` (None without a fresh report); `queue_len` is Serve's cached queue
        length (0 if none); `peers` is the other routers' in-flight count there (None: not shared)."""
        if self.load_source == "reports":
            since = None if reported is None else recorded_at
            return (reported or 0) + self._recent.count_since(replica_id, since, now)
        if peers is not None:
            return max(self._in_flight[replica_id] + peers, queue_len)
        left = 0 if reported is None else max(0, reported - self._finished_since(replica_id, recorded_at))
        return max(left, self._in_flight[replica_id], queue_len)

    def in_flight(self) -> dict[str, int]:
        """This router's requests in flight per replica (what it shares with the other routers)."""
        return {replica_id: n for replica_id, n in self._in_flight.items() if n > 0}

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas that are gone."""
        live = set(replica_ids)
        for replica_id in [r for r in self._in_flight if r not in live]:
            del self._in_flight[replica_id]
        for replica_id in [r for r in self._completed if r not in live]:
            del self._completed[replica_id]
        self._recent.retain(live)

    def _finished_since(self, replica_id: str, recorded_at: float) -> int:
        """This router's requests that were running at `recorded_at` and have completed since
        (completions are in time order: only the tail is after `recorded_at`)."""
        count = 0
        for routed_at, completed_at in reversed(self._completed.get(replica_id, ())):
            if completed_at <= recorded_at:
                break
            count += routed_at <= recorded_at
        return count

    def _release(self, replica_id: str) -> None:
        if self._in_flight[replica_id] > 0:
            self._in_flight[replica_id] -= 1
