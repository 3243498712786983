"""The routers' shared placement log: followers read others' placements after their cursor, a
recreated board restarts them, the log stays bounded, and a long poll wakes on another router's
placement but not on the follower's own."""

from __future__ import annotations

import asyncio

from router.route_log import RouteLog, pack_hashes, unpack_hashes


def test_followers_read_other_routers_placements_after_their_cursor() -> None:
    log = RouteLog(clock=lambda: 100.0)
    log.publish("a", "r1", pack_hashes([1, 2]))
    log.publish("b", "r2", pack_hashes([3]))
    epoch, cursor, entries = log.since("", 0, "a")  # an unknown epoch reads from the start
    assert epoch == log.epoch and cursor == 2
    assert [(e.router_id, e.replica_id, unpack_hashes(e.block_hashes), e.published_at) for e in entries] == [
        ("b", "r2", [3], 100.0)
    ]
    log.publish("a", "r1", pack_hashes([4]))
    assert log.since(epoch, cursor, "a")[1:] == (3, [])  # own placements are skipped, the cursor moves
    assert [e.seq for e in log.since(epoch, cursor, "b")[2]] == [3]
    assert [e.seq for e in log.since("old-epoch", 3, "c")[2]] == [1, 2, 3]


def test_the_log_keeps_only_the_last_entries() -> None:
    log = RouteLog(max_entries=2)
    for i in range(5):
        log.publish("a", f"r{i}", pack_hashes([i]))
    assert [e.replica_id for e in log.since(log.epoch, 0, "b")[2]] == ["r3", "r4"]


def test_a_long_poll_wakes_on_another_routers_placement_only() -> None:
    async def scenario() -> tuple[list[str], float, list[str]]:
        log = RouteLog()
        waiter = asyncio.create_task(log.wait_since(log.epoch, 0, "a", timeout_s=10.0))
        await asyncio.sleep(0.01)
        log.publish("a", "own", pack_hashes([1]))  # the follower's own placement: it keeps waiting
        await asyncio.sleep(0.01)
        assert not waiter.done()
        log.publish("b", "theirs", pack_hashes([2]))
        _, cursor, entries = await asyncio.wait_for(waiter, 1.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        _, _, none = await log.wait_since(log.epoch, cursor, "a", timeout_s=0.05)
        return [e.replica_id for e in entries], loop.time() - start, [e.replica_id for e in none]

    woken_by, waited_s, timed_out = asyncio.run(scenario())
    assert woken_by == ["theirs"]
    assert timed_out == [] and waited_s >= 0.04


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
