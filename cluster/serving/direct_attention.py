"""Direct streaming, replica side: an `Attention` replica that also serves the OpenAI API, so HAProxy
can send a client's request straight to the replica the route chooser picked
(`cluster/serving/route_chooser.py`) and its chunks go back over one HTTP connection, with no gateway replica
relaying each chunk over Ray (`spec.gateway.direct_streaming`).

The API is the gateway's own (`gateway.api.build_app`) over this replica's engine, with every
request timed into the replica's metrics like a relayed one. Per-key rate limits are the
application's shared store when limits are set (`cluster.serving.shared_limits`: a tenant's requests spread
over every replica); `/ready` asks the same application-wide question as the gateway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from cluster.serving.attention_deployment import AttentionDeployment
from cluster.serving.gateway_deployment import api_limits, gateway_config, is_app_ready
from cluster.serving.metrics_ray import ray_metrics
from cluster.spec import ClusterSpec
from gateway.engine_client import EngineClient
from protocol.messages import Chunk, GenerateRequest


class ReplicaEngineClient(EngineClient):
    """The gateway's engine client for the replica it runs in."""

    def __init__(self, replica: AttentionDeployment) -> None:
        self.replica = replica

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self.replica.chunks(request)

    async def is_ready(self) -> bool:
        return self.replica.engine.is_alive() and await is_app_ready(self.replica.pool)


class DirectAttentionDeployment(AttentionDeployment):
    """Wrapped with `serve.ingress()` by the application: Serve calls `__serve_build_asgi_app__`
    once the engine is up."""

    async def __init__(  # type: ignore[misc]
        self, spec: ClusterSpec, pool: DeploymentHandle | None, limits: DeploymentHandle | None
    ) -> None:
        await super().__init__(spec, pool)
        self.limits = limits

    def __serve_build_asgi_app__(self) -> Any:
        from gateway.api import build_app

        tokenizer = self.engine.engine.tokenizer
        config = gateway_config(self.spec)
        return build_app(
            ReplicaEngineClient(self), tokenizer, config, ray_metrics(), api_limits(config, self.limits)
        )
