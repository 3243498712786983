"""The prefix-aware router inside a real Serve app: three replicas publish the blocks they served
through `ReplicaReportBuilder`; a burst of prompts sharing a system block spreads by load, then
two routers (the driver's handle and one in another process, like a second gateway; guesses off)
send each follow-up to the replica holding its prefix, although the tie-break alone would send
them all to one replica; the driver's router records its decisions through `observability`."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from typing import Any

import pytest

from observability.recorder import Metrics, PrometheusBackend
from protocol.block_hash import block_hashes
from protocol.messages import GenerateRequest
from protocol.report import ReplicaReport, routing_stats
from protocol.sampling import SamplingParams
from replicas.engine.block_pool import KVEvent
from router.policy import RouterConfig, rendezvous_key
from router.report import ReplicaReportBuilder
from router.serve_adapter import PrefixAwareRequestRouter

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.integration
B = 4
STATS_PERIOD_S = 0.2
SYSTEM = [7, 7, 7, 7]  # one shared block, like a system prompt
USERS = [[10 * i + j for j in range(8)] for i in range(1, 7)]  # two distinct blocks each
PROMPTS = [SYSTEM + user + [1] for user in USERS]  # 13 tokens: 3 full blocks, all 3 can hit
FOLLOW_UPS = [[*p[:12], 2, 3, 4, 5, 6] for p in PROMPTS]  # same 3 blocks + 1 new; 17 tokens


class Recorder:
    """Stands in for an attention replica: "caches" every full block of what it serves."""

    def __init__(self) -> None:
        self._reports = ReplicaReportBuilder(block_size=B, window=1024)
        self._held: set[int] = set()
        self._num_running = 0

    async def generate(self, request: GenerateRequest, sleep_s: float = 0.0, dry_run: bool = False) -> str:
        self._num_running += 1
        try:
            await asyncio.sleep(sleep_s)
            if not dry_run:
                new = tuple(
                    h for h in block_hashes(request.prompt_token_ids, B, request.salt) if h not in self._held
                )
                self._held.update(new)
                self._reports.add_events([KVEvent("stored", new, "full"), KVEvent("stored", new, "swa")])
            return str(serve.get_replica_context().replica_id.unique_id)
        finally:
            self._num_running -= 1

    def record_routing_stats(self) -> dict[str, ReplicaReport]:
        return routing_stats(self._reports.build(self._num_running, 0, len(self._held) / 1000))


PrefixRecorder = serve.deployment(
    name="PrefixRecorder", num_replicas=3, max_ongoing_requests=8, ray_actor_options={"num_cpus": 0}
)(Recorder)


@functools.cache
def _backend() -> PrometheusBackend:
    return PrometheusBackend()


@functools.cache
def prometheus_metrics() -> Metrics:
    """The routers' metrics: one registry per process (cached: a registry rejects a second
    registration of the same names)."""
    return Metrics(_backend())


class RecordingRouter(PrefixAwareRequestRouter):
    """The prefix-aware router recording into this process's registry (as the cluster's records
    into Ray's metrics)."""

    def make_metrics(self) -> Metrics | None:
        return prometheus_metrics()


def _total(name: str, **labels: str) -> float:
    """Sum of a metric's samples in this process's registry, over series matching `labels`."""
    return sum(
        sample.value
        for family in _backend().registry.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


METRICS = ("decisions", "expected_hit_tokens", "prompt_tokens")


def _send(handle: Any, prompt: list[int], request_id: str, salt: str | None = None, **extra: Any) -> Any:
    request = GenerateRequest(request_id, prompt, SamplingParams(), salt)
    return handle.generate.remote(request, **extra)


# Between two follow-ups, as a user's or agent's next turn: Serve tells a router that a request
# ended in a callback that can run after the caller already has the result, so a next request
# sent at once may still count the previous one as in flight (3 cached blocks here are worth less
# than one request of load).
THINK_S = 0.1


def _route_follow_ups(handle: Any, salt: str | None = None) -> list[str]:
    """Each follow-up through `handle`'s router (dry run: the replica caches nothing for it)."""
    holders = []
    for i, p in enumerate(FOLLOW_UPS):
        time.sleep(THINK_S)
        holders.append(_send(handle, p, f"f{i}", salt, dry_run=True).result(timeout_s=30))
    return holders


class OtherGateway:
    """A second router in its own process, like another gateway replica. (A second handle in the
    same process would be a second router there, which Ray 2.60 may leave without its deployment
    config while routing stats are broadcast often: its first request then hangs.)"""

    def __init__(self, app_name: str) -> None:
        self._handle = serve.get_deployment_handle("PrefixRecorder", app_name=app_name)

    def route_follow_ups(self) -> list[str]:
        return _route_follow_ups(self._handle)


def _recorded_pass(route: Any) -> tuple[list[str], list[float]]:
    """One pass of `route` and what this process's router recorded during it: prefix decisions,
    then each of METRICS."""

    def totals() -> list[float]:
        prefix = _total("ray_mimo_router_decisions_total", reason="prefix")
        return [prefix, *(_total(f"ray_mimo_router_{m}_total") for m in METRICS)]

    before = totals()
    routed = route()
    return routed, [after - b for after, b in zip(totals(), before, strict=True)]


def _until_equal(route: Any, expected: list[str], timeout_s: float) -> list[str]:
    """Routes until the result is `expected` (reports arrive every STATS_PERIOD_S) or time is up."""
    deadline = time.monotonic() + timeout_s
    routed = route()
    while routed != expected and time.monotonic() < deadline:
        time.sleep(STATS_PERIOD_S)
        routed = route()
    return routed


def test_make_request_router_config_rejects_a_period_that_makes_every_replica_stale() -> None:
    """Catches a deployment whose reports arrive slower than they go stale (prefix routing never on)."""
    from router.serve_adapter import make_request_router_config

    with pytest.raises(ValueError, match="at least twice the routing stats period"):
        make_request_router_config(RouterConfig(stale_after_s=1.0), stats_period_s=1.0)
    config = make_request_router_config(RouterConfig(block_size=B), stats_period_s=0.5)
    assert config.request_routing_stats_period_s == 0.5
    assert RouterConfig.from_kwargs(config.request_router_kwargs) == RouterConfig(block_size=B)


def test_prefix_router_in_serve(ray_cluster: object) -> None:
    """Catches a router that ignores replica reports, hashes differently from the replicas, does not
    spread a burst by load, whose view differs between two routers, or that records no metrics."""
    from router.serve_adapter import make_request_router_config

    # No guesses: the follow-ups below must be placed by the replicas' reports alone.
    config = RouterConfig(block_size=B, stale_after_s=5.0, guess_ttl_s=0.0)
    router_config = make_request_router_config(config, STATS_PERIOD_S, RecordingRouter)
    app_name = "router_test"
    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(
            PrefixRecorder.options(request_router_config=router_config).bind(),
            name=app_name,
            route_prefix=None,
        )
        # A burst: six prompts at once, each held 1 s, so load (not reports) decides the spread.
        responses = [_send(handle, p, f"p{i}", sleep_s=1.0) for i, p in enumerate(PROMPTS)]
        holders = [r.result(timeout_s=30) for r in responses]
        assert sorted(Counter(holders).values()) == [2, 2, 2]
        # Ties go by rendezvous on the shared first block: without reports every follow-up would go
        # to that one replica, which holds only two of the six prefixes.
        tie_first = min(set(holders), key=lambda r: rendezvous_key(block_hashes(SYSTEM, B)[0], r))
        assert sum(h != tie_first for h in holders) == 4

        assert _until_equal(lambda: _route_follow_ups(handle), holders, timeout_s=20.0) == holders
        other = ray.remote(num_cpus=0)(OtherGateway).remote(app_name)
        route_other = lambda: ray.get(other.route_follow_ups.remote(), timeout=60)  # noqa: E731
        assert _until_equal(route_other, holders, timeout_s=20.0) == holders
        # Both routers agree at the end, and the driver's router recorded that pass: 6 prefix
        # decisions, 3 cached blocks each. (A pass may repeat: a report snapshot taken while a dry
        # run was in flight counts that request as load until the next report replaces it.)
        recorded: list[float] = []

        def route_recorded() -> list[str]:
            routed, recorded[:] = _recorded_pass(lambda: _route_follow_ups(handle))
            return routed

        assert _until_equal(route_recorded, holders, timeout_s=20.0) == holders
        assert recorded == [6, 6, 6 * 3 * B, 6 * len(FOLLOW_UPS[0])]
    finally:
        serve.shutdown()


class LateGateway:
    """Another gateway's router that starts after a burst: routes one unrelated prompt first (its
    first decision starts following the route board), waits until every replica's report and the
    board's placements have arrived, then routes the follow-ups."""

    def __init__(self, app_name: str) -> None:
        self._handle = serve.get_deployment_handle("PrefixRecorder", app_name=app_name)

    def route_follow_ups(self, salt: str) -> list[str]:
        _send(self._handle, [99] * 13, "warm-up", dry_run=True).result(timeout_s=30)
        time.sleep(15 * STATS_PERIOD_S)  # reports, and the board's reply to its first long poll
        return _route_follow_ups(self._handle, salt)


def _wait_for_new_board(name: str, killed_id: object, timeout_s: float) -> None:
    """Until the driver's router has noticed the kill and created the board again: placements
    it publishes before then go to the dead board and are dropped (best effort, by design)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ray.get_actor(name)._actor_id != killed_id:
                return
        except ValueError:  # no actor of that name (yet)
            pass
        assert time.monotonic() < deadline, "the driver's router did not create the board again"
        time.sleep(0.2)


def test_gateway_routers_share_guesses_through_the_route_board(ray_cluster: object) -> None:
    """Catches routers of several gateways that keep their guesses to themselves, or that lose them
    for good when the board dies: the replicas here never report the bursts' blocks (dry runs), so
    only the first router's guesses, shared through the board, can send each follow-up where its
    prompt went; a router without them sends at least four of the six to the tie-break replica."""
    from router.route_board import RETRY_S
    from router.serve_adapter import make_request_router_config

    config = RouterConfig(block_size=B, stale_after_s=5.0, guess_ttl_s=60.0, route_board="test-route-board")
    app_name = "board_test"
    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(
            PrefixRecorder.options(
                request_router_config=make_request_router_config(config, STATS_PERIOD_S)
            ).bind(),
            name=app_name,
            route_prefix=None,
        )
        for salt in ("before", "after the board was killed"):
            # reports taken while the previous pass's requests ran count them as load until newer
            # ones arrive: let those arrive first, so that load alone spreads this burst (CI saw
            # [1, 2, 3] when a loaded machine delayed them)
            time.sleep(5 * STATS_PERIOD_S)
            responses = [
                _send(handle, p, f"p{i}", salt, sleep_s=1.0, dry_run=True) for i, p in enumerate(PROMPTS)
            ]
            holders = [r.result(timeout_s=30) for r in responses]
            assert sorted(Counter(holders).values()) == [2, 2, 2]
            tie_first = min(set(holders), key=lambda r: rendezvous_key(block_hashes(SYSTEM, B, salt)[0], r))
            assert sum(h != tie_first for h in holders) == 4
            late = ray.remote(num_cpus=0)(LateGateway).remote(app_name)
            assert ray.get(late.route_follow_ups.remote(salt), timeout=60) == holders
            ray.kill(late)  # so that the board is created again by the driver's router, not by this one
            killed = ray.get_actor("test-route-board")
            ray.kill(killed)
            _wait_for_new_board("test-route-board", killed._actor_id, timeout_s=30.0 + RETRY_S)
    finally:
        serve.shutdown()


def test_a_request_no_replica_has_room_for_fails_after_the_bounded_wait(ray_cluster: object) -> None:
    """Catches a routing loop that waits forever, or spins a core, while every replica is full: the
    one replica's one slot is held for 8 s, and the next request must fail with RoutingTimeout
    after the 1 s bound, while the first is still running."""
    from router.serve_adapter import RoutingTimeout, make_request_router_config

    config = RouterConfig(block_size=B, max_routing_wait_s=1.0)
    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(
            PrefixRecorder.options(
                name="OneSlot",
                num_replicas=1,
                max_ongoing_requests=1,
                request_router_config=make_request_router_config(config, STATS_PERIOD_S),
            ).bind(),
            name="one_slot_test",
            route_prefix=None,
        )
        _send(handle, PROMPTS[0], "warm-up", dry_run=True).result(timeout_s=30)
        busy = _send(handle, PROMPTS[0], "busy", sleep_s=8.0, dry_run=True)
        time.sleep(0.5)  # the busy request holds the slot
        with pytest.raises(RoutingTimeout, match=r"within 1\.0 s"):
            _send(handle, PROMPTS[1], "blocked", dry_run=True).result(timeout_s=30)
        with pytest.raises(TimeoutError):
            busy.result(timeout_s=0.01)  # still running: the refusal did not wait for the slot
        assert busy.result(timeout_s=30)
    finally:
        serve.shutdown()
