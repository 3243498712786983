"""The routers' shared board: followers read others' placements and in-flight counts after their
cursor, a recreated board restarts them, the log stays bounded, a long poll wakes on another
router's update but not on the follower's own, and a client sends its counts on change or on a
heartbeat only."""

from __future__ import annotations

import asyncio

from router.route_log import LoadsSender, RouteLog, pack_hashes, unpack_hashes


def test_followers_read_other_routers_placements_after_their_cursor() -> None:
    log = RouteLog(clock=lambda: 100.0)
    log.publish("a", "r1", pack_hashes([1, 2]))
    log.publish("b", "r2", pack_hashes([3]))
    read = log.since("", 0, "a")  # an unknown epoch reads from the start
    epoch, cursor = read.epoch, read.cursor
    assert epoch == log.epoch and cursor == 2
    assert [
        (e.router_id, e.replica_id, unpack_hashes(e.block_hashes), e.published_at) for e in read.entries
    ] == [("b", "r2", [3], 100.0)]
    log.publish("a", "r1", pack_hashes([4]))
    own = log.since(epoch, cursor, "a")  # own placements are skipped, the cursor moves
    assert (own.cursor, own.entries, own.is_empty) == (3, [], True)
    assert [e.seq for e in log.since(epoch, cursor, "b").entries] == [3]
    assert [e.seq for e in log.since("old-epoch", 3, "c").entries] == [1, 2, 3]


def test_followers_read_each_other_routers_latest_counts_once() -> None:
    """Catches a follower summing stale counts (a router's earlier message not replaced), reading
    its own counts back, re-reading counts it already has (its cursor ignored), or skipping
    placements because counts took sequence numbers between them (seen: the cursor arithmetic
    assumed consecutive placement numbers and dropped every other router's placement)."""
    log = RouteLog(clock=lambda: 7.0)
    log.publish_loads("a", {"r1": 2, "r2": 0})
    log.publish_loads("b", {"r1": 1})
    log.publish_loads("a", {"r1": 3})  # replaces a's first message
    read = log.since("", 0, "b")
    assert [(e.router_id, e.counts, e.seq, e.published_at) for e in read.loads] == [
        ("a", (("r1", 3),), 3, 7.0)
    ]
    assert read.entries == [] and not read.is_empty
    assert log.since(read.epoch, read.cursor, "b").loads == []  # nothing new since
    log.publish("a", "r1", pack_hashes([9]))  # seq 4, after counts took seqs 1-3
    assert [e.seq for e in log.since(read.epoch, read.cursor, "b").entries] == [4]
    assert [e.router_id for e in log.since(read.epoch, 1, "c").loads] == ["b", "a"]  # b (seq 2), a (seq 3)


def test_the_log_keeps_only_the_last_entries() -> None:
    log = RouteLog(max_entries=2)
    for i in range(5):
        log.publish("a", f"r{i}", pack_hashes([i]))
    assert [e.replica_id for e in log.since(log.epoch, 0, "b").entries] == ["r3", "r4"]


def test_a_long_poll_wakes_on_another_routers_placement_only() -> None:
    """Catches a follower woken by its own placements, or by counts alone (each wake is a Ray call:
    with 4 gateways on 2 shared cores, waking on counts took a tenth of a core from the engines),
    or counts not delivered with the next placement."""

    async def scenario() -> tuple[list[str], float, list[str], bool, list[str]]:
        log = RouteLog()
        waiter = asyncio.create_task(log.wait_since(log.epoch, 0, "a", timeout_s=10.0))
        await asyncio.sleep(0.01)
        log.publish("a", "own", pack_hashes([1]))  # the follower's own placement: it keeps waiting
        log.publish_loads("a", {"own": 1})  # and its own counts
        await asyncio.sleep(0.01)
        assert not waiter.done()
        log.publish("b", "theirs", pack_hashes([2]))
        read = await asyncio.wait_for(waiter, 1.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        none = await log.wait_since(log.epoch, read.cursor, "a", timeout_s=0.05)
        waited_s = loop.time() - start
        counts_waiter = asyncio.create_task(log.wait_since(log.epoch, none.cursor, "a", timeout_s=10.0))
        await asyncio.sleep(0.01)  # waiting now
        log.publish_loads("b", {"theirs": 2})
        await asyncio.sleep(0.02)
        woken_by_counts = counts_waiter.done()
        log.publish("c", "next", pack_hashes([3]))
        with_counts = await asyncio.wait_for(counts_waiter, 1.0)
        return (
            [e.replica_id for e in read.entries],
            waited_s,
            [e.replica_id for e in none.entries],
            woken_by_counts,
            [e.router_id for e in with_counts.loads],
        )

    woken_by, waited_s, timed_out, woken_by_counts, delivered = asyncio.run(scenario())
    assert woken_by == ["theirs"]
    assert timed_out == [] and waited_s >= 0.04
    assert not woken_by_counts and delivered == ["b"]


def test_a_board_client_outside_ray_stops_instead_of_connecting_again() -> None:
    """Catches a router's board loop that outlives `ray.shutdown()` and, through Ray's auto-init,
    connects its process to the cluster again (seen in CI: the test cluster then refused to stop)."""
    import ray

    from router.route_board import BoardClient

    assert not ray.is_initialized()
    client = BoardClient("no-board")
    client.publish("replica", [1, 2])
    asyncio.run(asyncio.wait_for(client.run(lambda *_: None), timeout=5.0))
    assert not ray.is_initialized()


def test_a_router_sends_its_counts_on_change_or_heartbeat_only() -> None:
    """Catches a router flooding the board with unchanged counts every batch, never repeating them
    (the board would drop a live router's requests after LOADS_TTL_S), or not sending them again
    to a recreated board."""
    sender = LoadsSender(heartbeat_s=1.0)
    assert sender.to_send({"r": 1}, now=0.0) == {"r": 1}
    assert sender.to_send({"r": 1}, now=0.5) is None and not sender.is_heartbeat_due(0.5)
    assert sender.to_send({"r": 2}, now=0.6) == {"r": 2}  # changed
    assert sender.is_heartbeat_due(1.6) and sender.to_send({"r": 2}, now=1.6) == {"r": 2}
    sender.reset()  # a recreated board
    assert sender.to_send({"r": 2}, now=1.7) == {"r": 2}
