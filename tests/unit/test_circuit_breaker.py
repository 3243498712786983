"""The per-replica circuit breaker (`cluster.serving.circuit_breaker`) and how the gateway's request
router uses it: exact open/close times, probation, never refusing every replica, and a replica Serve
reports unavailable three times left out of routing for the cooldown."""

from __future__ import annotations

import asyncio

from cluster.serving.circuit_breaker import BreakerConfig, CircuitBreaker

CONFIG = BreakerConfig(failures_to_open=3, window_s=30.0, cooldown_s=10.0)


def test_opens_after_n_failures_in_the_window_and_closes_after_the_cooldown() -> None:
    """Catches a breaker that never opens, opens early, or never lets the replica back."""
    b = CircuitBreaker(CONFIG)
    assert not b.on_failure("a", 0.0) and not b.on_failure("a", 1.0)
    assert b.allows("a", 1.5)
    assert b.on_failure("a", 2.0)  # the third: open until 12.0
    assert not b.allows("a", 2.0) and not b.allows("a", 11.99) and b.allows("a", 12.0)
    assert b.allows("b", 5.0)  # other replicas are not affected
    assert b.num_open(5.0) == 1 and b.num_open(12.0) == 0


def test_failures_spread_wider_than_the_window_do_not_open_it() -> None:
    b = CircuitBreaker(CONFIG)
    assert not any(b.on_failure("a", t) for t in (0.0, 20.0, 40.0, 60.0))  # never 3 within 30 s
    assert b.allows("a", 61.0)


def test_a_failure_on_probation_opens_it_again_at_once() -> None:
    """Catches a replica that keeps failing getting N more requests after every cooldown."""
    b = CircuitBreaker(CONFIG)
    for t in (0.0, 1.0, 2.0):
        b.on_failure("a", t)
    assert b.on_failure("a", 13.0)  # on probation until 42.0: open again until 23.0
    assert not b.allows("a", 22.0) and b.allows("a", 23.0)
    assert not b.on_failure("a", 80.0)  # probation over: counting starts afresh


def test_failures_of_requests_sent_before_it_opened_do_not_extend_the_cooldown() -> None:
    b = CircuitBreaker(CONFIG)
    for t in (0.0, 1.0, 2.0):
        b.on_failure("a", t)
    assert not b.on_failure("a", 5.0)
    assert b.allows("a", 12.0)


def test_never_refuses_every_replica() -> None:
    """Catches a partial failure turned into a full outage when every breaker is open."""
    b = CircuitBreaker(CONFIG)
    for replica in ("a", "b"):
        for t in (0.0, 1.0, 2.0):
            b.on_failure(replica, t)
    assert b.allowed(["a", "b"], 5.0) == ["a", "b"]  # both open: both tried
    assert b.allowed(["a", "b", "c"], 5.0) == ["c"]
    for t in (20.0, 21.0, 22.0):
        b.on_failure("c", t)
    assert b.allowed(["a", "b", "c"], 23.0) == ["a", "b"]  # a and b are back, c is open


def test_forgets_replicas_that_left() -> None:
    b = CircuitBreaker(CONFIG)
    for t in (0.0, 1.0, 2.0):
        b.on_failure("a", t)
    b.retain(["b"])
    assert b.allows("a", 3.0)


def test_the_gateway_router_leaves_a_replica_serve_reports_unavailable_out_of_routing() -> None:
    """Catches the breaker not being wired: Serve's `on_replica_actor_unavailable` reports feed
    it, and `choose_replicas` ranks only the replicas it allows (all of them if none is)."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    from cluster.serving.request_router import ClusterRequestRouter

    class Replica:  # what the router reads of Serve's RunningReplica
        def __init__(self, unique_id: str) -> None:
            self.replica_id = ReplicaID(unique_id=unique_id, deployment_id=deployment)
            self.routing_stats: dict[str, object] = {}
            self.max_ongoing_requests = 8

    deployment = DeploymentID(name="Attention", app_name="mimo")
    a, b = Replica("a"), Replica("b")

    async def ids(router: ClusterRequestRouter, replicas: list[Replica]) -> list[str]:
        ranked = await router.choose_replicas(replicas, None)
        return [group[0].replica_id.unique_id for group in ranked]

    async def scenario() -> None:
        router = ClusterRequestRouter(deployment, DeploymentHandleSource.UNKNOWN)
        assert sorted(await ids(router, [a, b])) == ["a", "b"]
        for _ in range(3):
            router.on_replica_actor_unavailable(a.replica_id)
        assert await ids(router, [a, b]) == ["b"]
        assert await ids(router, [a]) == ["a"]  # the only replica: still tried

    asyncio.run(scenario())
