"""The attention deployment's request router: `router.serve_adapter.PrefixAwareRequestRouter` with
the cluster's Ray metrics backend, built in the router's own process (each gateway replica)."""

from __future__ import annotations

from cluster.serving.metrics_ray import ray_metrics
from observability.recorder import Metrics
from router.serve_adapter import PrefixAwareRequestRouter


class ClusterRequestRouter(PrefixAwareRequestRouter):
    def make_metrics(self) -> Metrics | None:
        return ray_metrics()
