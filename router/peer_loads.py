"""What the other gateways' routers have in flight, per replica, as they last told the route board.

Each router publishes its whole in-flight count per replica (a snapshot, not deltas: a lost or
repeated message cannot make the sum drift) whenever it changes. A router adds the others' latest
counts to its own in-flight count, so with several gateways each one sees every request in flight,
not only its own plus a second-old report. The board drops a router it has not heard from
(`router.route_log.LOADS_TTL_S`); a follower that loses the board, or finds it recreated, clears
what it had (`clear`) and counts on its own again. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping


class PeerLoads:
    def __init__(self) -> None:
        self._peers: dict[str, dict[str, int]] = {}  # router id -> requests in flight per replica

    def update(self, router_id: str, counts: Mapping[str, int]) -> None:
        """`router_id`'s in-flight requests per replica, replacing what it said before."""
        self._peers[router_id] = {r: n for r, n in counts.items() if n > 0}

    def clear(self) -> None:
        """Forget every other router (the board is gone or was recreated)."""
        self._peers.clear()

    @property
    def is_live(self) -> bool:
        """Some other router's counts are known (an idle one's included): its requests are counted."""
        return bool(self._peers)

    def num_requests(self, replica_id: str) -> int:
        """The other routers' requests in flight on `replica_id`."""
        return sum(counts.get(replica_id, 0) for counts in self._peers.values())
