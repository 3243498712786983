"""Shared load between gateway routers: router/peer_loads.py, its use in router/replica_loads.py and
router/router_core.py (the other routers' in-flight counts replace a second-old report)."""

from __future__ import annotations

from router.peer_loads import PeerLoads
from router.policy import RouterConfig
from router.replica_loads import ReplicaLoads
from router.route_log import RouteLog
from router.router_core import RouterCore


def test_a_routers_latest_counts_replace_its_earlier_ones() -> None:
    """Catches counts summed over messages (a router's requests counted once per message), or an
    idle router (no requests) switching shared counting off."""
    peers = PeerLoads()
    assert not peers.is_live
    peers.update("b", {"r1": 2, "r2": 1})
    peers.update("b", {"r1": 3})
    peers.update("c", {"r1": 1, "r2": 0})
    assert (peers.num_requests("r1"), peers.num_requests("r2")) == (4, 0)
    peers.update("b", {})
    assert peers.is_live and peers.num_requests("r1") == 1
    peers.clear()
    assert not peers.is_live and peers.num_requests("r1") == 0


def test_the_board_drops_a_silent_router_and_heartbeats_wake_nobody() -> None:
    """Catches a dead gateway's requests counted forever, or every unchanged heartbeat waking every
    follower (each wake is a Ray call; on a shared host they took CPU from the engines)."""
    clock = [0.0]
    log = RouteLog(clock=lambda: clock[0], loads_ttl_s=5.0)
    log.publish_loads("b", {"r1": 2})
    read = log.since("", 0, "a")
    assert [e.counts for e in read.loads] == [(("r1", 2),)]
    clock[0] = 4.0
    assert log.publish_loads("b", {"r1": 2}) == read.cursor  # unchanged: no new update
    clock[0] = 8.0
    assert log.since(read.epoch, read.cursor, "a").is_empty  # heard at 4.0: still alive
    clock[0] = 9.5
    expired = log.since(read.epoch, read.cursor, "a")
    assert [(e.router_id, e.counts) for e in expired.loads] == [("b", ())]


def test_shared_counts_replace_the_report_that_still_counts_finished_requests() -> None:
    """Catches the herding seen with several gateways: a 1-second-old report still counts 6
    requests that other routers saw finish; with their counts shared, the estimate is this
    router's 1 in flight plus their 2, not 6."""
    loads = ReplicaLoads("handle", horizon_s=10.0)
    loads.routed("a", now=1.0)
    assert loads.num_requests("a", reported=6, recorded_at=0.5, queue_len=0, now=1.5) == 6  # alone
    assert loads.num_requests("a", reported=6, recorded_at=0.5, queue_len=0, now=1.5, peers=2) == 3
    assert loads.num_requests("a", reported=6, recorded_at=0.5, queue_len=4, now=1.5, peers=2) == 4
    assert loads.in_flight() == {"a": 1}


def test_a_router_counts_other_routers_requests_while_they_are_heard_from() -> None:
    """Catches the core ignoring shared counts, applying them with `share_loads` off, or keeping
    them after the board failed."""
    core = RouterCore(RouterConfig(block_size=4))
    core.routed("q1", "r1", [], now=0.0, wall_now=100.0)
    core.apply_peer_loads("other", {"r1": 2, "r2": 5})
    assert core.own_loads() == {"r1": 1}
    assert core.candidate("r1", [], 0, 0, now=1.0, wall_now=101.0).num_requests == 3
    assert core.candidate("r2", [], 0, 0, now=1.0, wall_now=101.0).num_requests == 5
    core.forget_peer_loads()  # the board failed
    assert core.candidate("r2", [], 0, 0, now=1.0, wall_now=101.0).num_requests == 0
    unshared = RouterCore(RouterConfig(block_size=4, share_loads=False))
    unshared.apply_peer_loads("other", {"r2": 5})
    assert unshared.candidate("r2", [], 0, 0, now=1.0, wall_now=101.0).num_requests == 0


def test_completed_moved_and_forgotten_requests_leave_the_shared_counts() -> None:
    """Catches a router publishing requests that finished, went elsewhere or were never sent
    (every other router would then avoid that replica)."""
    core = RouterCore(RouterConfig(block_size=4))
    for request_id in ("q1", "q2", "q3"):
        core.routed(request_id, "r1", [7], now=0.0, wall_now=0.0)
    core.completed("q1", "r1", wall_now=1.0)
    assert core.moved("q2", "r2", now=1.0) == (7,)
    core.forget("q3")
    assert core.own_loads() == {"r2": 1}
    core.completed("q2", "r1", wall_now=2.0)  # not where it ran: ignored
    assert core.own_loads() == {"r2": 1}
