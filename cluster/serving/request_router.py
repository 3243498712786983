"""The attention deployment's request router: `router.serve_adapter.PrefixAwareRequestRouter` with
the cluster's Ray metrics backend, built in the router's own process (each gateway replica), and a
circuit breaker per replica (`cluster.serving.circuit_breaker`): a replica Serve reports as
unavailable again and again (unreachable, hung, its node partitioned; Serve alone keeps trying it
until its health checks fail) is left out of routing for a cooldown while others can serve."""

from __future__ import annotations

import logging
import time
from typing import Any

from cluster.serving.circuit_breaker import BreakerConfig, CircuitBreaker
from cluster.serving.metrics_ray import ray_metrics
from observability.recorder import Metrics
from router.serve_adapter import PrefixAwareRequestRouter

logger = logging.getLogger(__name__)


class ClusterRequestRouter(PrefixAwareRequestRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.breaker = CircuitBreaker(BreakerConfig())

    def make_metrics(self) -> Metrics | None:
        return ray_metrics()

    def update_replicas(self, replicas: list[Any]) -> None:
        super().update_replicas(replicas)
        self.breaker.retain(r.replica_id.unique_id for r in replicas)

    def on_replica_actor_unavailable(self, replica_id: Any) -> None:
        super().on_replica_actor_unavailable(replica_id)
        if self.breaker.on_failure(replica_id.unique_id, time.monotonic()):
            logger.warning("replica %s keeps failing: not routed to for a cooldown", replica_id.unique_id)

    async def choose_replicas(
        self, candidate_replicas: list[Any], pending_request: Any = None
    ) -> list[list[Any]]:
        allowed = set(
            self.breaker.allowed((r.replica_id.unique_id for r in candidate_replicas), time.monotonic())
        )
        candidates = [r for r in candidate_replicas if r.replica_id.unique_id in allowed]
        ranked: list[list[Any]] = await super().choose_replicas(candidates, pending_request)
        return ranked
