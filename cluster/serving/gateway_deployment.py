"""The `Gateway` Serve deployment: the OpenAI API (`gateway.api.build_app`) built at replica start
from the spec, calling the Attention deployment through a handle routed by the prefix-aware router.
`/ready` is true only when every deployment is healthy and every expert shard answers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.serving.engine_clients import ServeEngineClient
from cluster.serving.metrics_ray import ray_metrics
from cluster.serving.shared_limits import SharedLimits
from cluster.spec import ClusterSpec
from gateway.config import GatewayConfig
from gateway.rate_limit import Limits, LocalLimits
from mimo.generation_config import SamplingDefaults

APP_NAME = "mimo"


def max_model_len(spec: ClusterSpec) -> int:
    from mimo.config import MiMoConfig
    from replicas.engine.engine_config import context_limit

    return context_limit(MiMoConfig.from_file(f"{spec.model.path}/config.json"), spec.engine.max_model_len)


def gateway_config(spec: ClusterSpec) -> GatewayConfig:
    g = spec.gateway
    return GatewayConfig(
        served_model_name=spec.model.served_name,
        max_model_len=max_model_len(spec),
        max_prompt_tokens=g.max_prompt_tokens,
        max_body_bytes=g.max_body_bytes,
        requests_per_minute=g.requests_per_minute,
        tokens_per_minute=g.tokens_per_minute,
        max_pending_requests=g.max_pending_requests,
        api_keys_file=g.api_keys_file,
        sampling_defaults=sampling_defaults(spec),
        default_thinking=g.default_thinking,
    )


def sampling_defaults(spec: ClusterSpec) -> SamplingDefaults:
    """The checkpoint's generation_config.json defaults, unless the spec turns them off."""
    from mimo.generation_config import NO_DEFAULTS, read_sampling_defaults

    return NO_DEFAULTS if spec.model.generation_config == "none" else read_sampling_defaults(spec.model.path)


def can_serve(replica_states: Mapping[str, Mapping[str, int]]) -> bool:
    """Every deployment (name -> replicas per state) has a RUNNING replica. A deployment that is
    UPSCALING, UPDATING or restarting a replica still serves on the ones running."""
    return bool(replica_states) and all(states.get("RUNNING", 0) >= 1 for states in replica_states.values())


async def is_app_ready(pool: DeploymentHandle | None) -> bool:
    """The application can serve (`can_serve`), and every expert shard answers."""
    status = (await asyncio.to_thread(serve.status)).applications.get(APP_NAME)  # serve.status blocks
    if status is None:
        return False
    # Serve reports states as ReplicaState members or as their names, depending on the path
    states = {
        name: {str(getattr(state, "value", state)): n for state, n in d.replica_states.items()}
        for name, d in status.deployments.items()
    }
    if not can_serve(states):
        return False
    return True if pool is None else bool(await pool.is_ready.remote())


def api_limits(config: GatewayConfig, store: DeploymentHandle | None) -> Limits:
    """This process's per-key limits, or the shared store's when the application has one
    (`cluster.serving.shared_limits`: more than one process serves the API)."""
    local = LocalLimits(config.requests_per_minute, config.tokens_per_minute)
    return local if store is None else SharedLimits(store, local)


class GatewayDeployment:
    def __init__(
        self,
        spec: ClusterSpec,
        attention: DeploymentHandle,
        pool: DeploymentHandle | None,
        limits: DeploymentHandle | None,
    ) -> None:
        self.spec = spec
        self.attention = attention
        self.pool = pool
        self.limits = limits

    def __serve_build_asgi_app__(self) -> Any:
        from gateway.api import build_app
        from mimo.tokenizer import Tokenizer

        client = ServeEngineClient(
            self.attention, lambda: is_app_ready(self.pool), self.spec.gateway.max_queue_wait_s
        )
        config = gateway_config(self.spec)
        tokenizer = Tokenizer.from_dir(self.spec.model.path)
        return build_app(client, tokenizer, config, ray_metrics(), api_limits(config, self.limits))
