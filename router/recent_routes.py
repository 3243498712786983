"""When each replica was last sent requests, for a router that never sees them end (direct
streaming: HAProxy sends them). A replica's load is then its last report plus the requests routed
to it after that report was taken; routings older than the horizon are forgotten."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class RecentRoutes:
    def __init__(self, horizon_s: float) -> None:
        if horizon_s <= 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
        self.horizon_s = horizon_s
        self._times: dict[str, deque[float]] = {}

    def note(self, replica_id: str, now: float) -> None:
        """One request routed to `replica_id` at `now` (monotonic, never decreasing)."""
        self._times.setdefault(replica_id, deque()).append(now)

    def count_since(self, replica_id: str, since: float | None, now: float) -> int:
        """Requests routed to the replica after `since` (None: every one within the horizon)."""
        times = self._times.get(replica_id)
        if not times:
            return 0
        while times and times[0] < now - self.horizon_s:
            times.popleft()
        if since is None:
            return len(times)
        count = 0
        for t in reversed(times):  # oldest first in the deque: only the tail is after `since`
            if t <= since:
                break
            count += 1
        return count

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas that are gone."""
        live = set(replica_ids)
        for replica_id in [r for r in self._times if r not in live]:
            del self._times[replica_id]
