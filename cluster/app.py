"""The Serve application built from a `ClusterSpec`: `Gateway` (OpenAI API ingress) -> `Attention`
(engine + KV cache per replica) -> expert shard actors owned by the `ExpertPool` deployment.

`app_builder({"spec": ...})` is the import path `serve deploy` and `mimo serve` both use. Attention
replicas call the shard actors directly (`RayTransport`), so the hot path never goes through a Serve
hop; the pool deployment only owns their lifetime (placement group, restarts) and their stats.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from cluster.engine_clients import ServeEngineClient, stream_request
from cluster.spec import ClusterSpec, SpecError
from gateway.config import GatewayConfig
from gateway.engine_client import EngineError

APP_NAME = "mimo"
ROUTING_STATS_PERIOD_S = 0.5  # how often Serve polls each attention replica for its report


def engine_config(spec: ClusterSpec) -> Any:
    from replicas.engine_config import EngineConfig

    e = spec.engine
    return EngineConfig(
        block_size=e.block_size,
        kv_cache_bytes=e.kv_cache_mib * 2**20,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        max_prefill_chunk=e.max_prefill_chunk,
        max_model_len=e.max_model_len,
        num_mtp_drafts=e.num_mtp_drafts,
        enable_prefix_cache=e.enable_prefix_cache,
        kv_dtype_bytes=4 if spec.model.dtype == "float32" else 2,
    )


def max_model_len(spec: ClusterSpec) -> int:
    from mimo.config import MiMoConfig

    limit = MiMoConfig.from_file(f"{spec.model.path}/config.json").max_position_embeddings
    return min(spec.engine.max_model_len or limit, limit)


class ExpertPoolDeployment:
    """Owns the expert shard actors: started in a placement group spread over nodes, restarted by
    Ray when their process dies. Attention replicas fetch the actor handles once."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from mimo.config import MiMoConfig
        from replicas.expert_placement import initial_placement
        from replicas.expert_pool import ExpertPool, ShardResources

        self.spec = ClusterSpec.model_validate(spec)
        config = MiMoConfig.from_file(f"{self.spec.model.path}/config.json")
        moe_layers = [i for i, is_moe in enumerate(config.is_moe_layer) if is_moe]
        self.placement = initial_placement(moe_layers, config.num_experts, self.spec.experts.num_shards)
        self.num_experts = config.num_experts
        x = self.spec.experts
        self.pool = ExpertPool.start(
            self.spec.model.path,
            self.placement,
            ShardResources(x.num_cpus, x.num_gpus, x.threads),
            x.placement_strategy,
            self.spec.model.dtype,
        )

    def actors(self) -> tuple[list[Any], Any, int]:
        return self.pool.actors, self.placement, self.num_experts

    async def is_ready(self) -> bool:
        try:
            await asyncio.wait_for(asyncio.gather(*(a.pid.remote() for a in self.pool.actors)), timeout=5)
            return True
        except Exception:  # a shard being restarted is not ready
            return False

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown()


class AttentionDeployment:
    """One data-parallel attention replica: its own engine and KV cache; experts via the pool."""

    async def __init__(self, spec: dict[str, Any], pool: DeploymentHandle | None) -> None:  # type: ignore[misc]
        import torch

        from mimo.tokenizer import Tokenizer
        from mimo.weights import load_model
        from replicas.async_engine import AsyncEngine
        from replicas.dispatch import ExpertDispatcher
        from replicas.engine import Engine
        from replicas.expert_pool import RayTransport
        from router.report import ReplicaReportBuilder

        self.spec = ClusterSpec.model_validate(spec)
        torch.set_num_threads(self.spec.engine.threads)
        dtype = getattr(torch, self.spec.model.dtype)
        model = load_model(self.spec.model.path, dtype=dtype, experts="none" if pool else "all")
        engine = Engine(model, Tokenizer.from_dir(self.spec.model.path), engine_config(self.spec))
        if pool is not None:
            actors, placement, num_experts = await pool.actors.remote()
            engine.runner.paged.dispatcher = ExpertDispatcher(RayTransport(actors), placement, num_experts)
        self.engine = AsyncEngine(engine)
        self.max_streams = self.spec.engine.max_num_seqs + self.spec.engine.max_queued_requests
        layout = engine.kv_cache.layout
        self.report = ReplicaReportBuilder(layout.block_size, layout.window)

    async def generate(
        self, *, prompt_token_ids: list[int], salt: str | None, params: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            stream = stream_request(
                self.engine,
                prompt_token_ids=prompt_token_ids,
                salt=salt,
                params=params,
                request_id=request_id,
                max_streams=self.max_streams,
            )
            async for chunk in stream:
                yield chunk.to_dict()
        except EngineError as e:
            yield {"refused": e.to_dict()}

    def record_routing_stats(self) -> dict[str, Any]:
        snap = self.engine.snapshot()
        self.report.add_events(self.engine.drain_kv_events())
        return self.report.build(
            num_running=snap.num_running,
            num_waiting=snap.num_waiting,
            kv_usage=snap.kv_usage.get("full", 0.0),
        )

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("engine thread stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class GatewayDeployment:
    """The OpenAI API; built at replica start (`__serve_build_asgi_app__`) from the spec."""

    def __init__(
        self, spec: dict[str, Any], attention: DeploymentHandle, pool: DeploymentHandle | None
    ) -> None:
        self.spec = ClusterSpec.model_validate(spec)
        self.attention = attention
        self.pool = pool

    async def _is_ready(self) -> bool:
        status = serve.status().applications.get(APP_NAME)
        if status is None or any(d.status != "HEALTHY" for d in status.deployments.values()):
            return False
        return True if self.pool is None else bool(await self.pool.is_ready.remote())

    def __serve_build_asgi_app__(self) -> Any:
        from gateway.api import build_app
        from mimo.tokenizer import Tokenizer

        s = self.spec
        config = GatewayConfig(
            served_model_name=s.model.served_name,
            max_model_len=max_model_len(s),
            max_prompt_tokens=s.gateway.max_prompt_tokens,
            max_body_bytes=s.gateway.max_body_bytes,
            requests_per_minute=s.gateway.requests_per_minute,
            tokens_per_minute=s.gateway.tokens_per_minute,
            max_pending_requests=s.gateway.max_pending_requests,
            api_keys_file=s.gateway.api_keys_file,
        )
        client = ServeEngineClient(self.attention, self._is_ready)
        return build_app(client, Tokenizer.from_dir(s.model.path), config)


def check_engine_fits(spec: ClusterSpec) -> None:
    """Raises SpecError naming `engine.kv_cache_mib` when the KV budget cannot hold one sequence of
    the context, before anything is deployed (a replica would otherwise fail to start, forever)."""
    from mimo.config import MiMoConfig
    from replicas.engine_config import build_layout

    try:
        build_layout(MiMoConfig.from_file(f"{spec.model.path}/config.json"), engine_config(spec))
    except ValueError as e:
        raise SpecError(
            "engine.kv_cache_mib", f"{e} (raise kv_cache_mib or lower engine.max_model_len)"
        ) from None


def required_cpus(spec: ClusterSpec) -> float:
    """Logical CPUs the application reserves (a private local cluster is started with at least this)."""
    num_shards = spec.experts.num_shards if spec.experts.transport == "ray" else 0
    return spec.attention.num_replicas * spec.attention.num_cpus + num_shards * spec.experts.num_cpus


def build_application(spec: ClusterSpec) -> Application:
    check_engine_fits(spec)
    data = spec.model_dump(mode="json")
    pool = None
    if spec.experts.transport == "ray":
        pool = serve.deployment(name="ExpertPool", num_replicas=1, ray_actor_options={"num_cpus": 0})(
            ExpertPoolDeployment
        ).bind(data)
    a = spec.attention
    attention = serve.deployment(
        name="Attention",
        num_replicas=a.num_replicas,
        max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=spec.engine.max_queued_requests,
        ray_actor_options={
            "num_cpus": a.num_cpus,
            "num_gpus": a.num_gpus,
            "runtime_env": {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}},
        },
        **_router_options(spec),
    )(AttentionDeployment).bind(data, pool)
    gateway = serve.deployment(
        name="Gateway",
        num_replicas=spec.gateway.num_replicas,
        max_ongoing_requests=spec.gateway.max_pending_requests,
        ray_actor_options={"num_cpus": 0},
    )(serve.ingress()(GatewayDeployment)).bind(data, attention, pool)
    return gateway


def _router_options(spec: ClusterSpec) -> dict[str, Any]:
    from router.policy import RouterConfig
    from router.serve_adapter import make_request_router_config

    r = spec.router
    config = RouterConfig(
        policy=r.policy,
        block_size=spec.engine.block_size,
        prefix_weight=r.prefix_weight,
        load_weight=r.load_weight,
        kv_weight=r.kv_weight,
        stale_after_s=r.stale_after_s,
    )
    return {
        "request_router_config": make_request_router_config(config, stats_period_s=ROUTING_STATS_PERIOD_S)
    }


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve deploy` / `serve run cluster.app:app_builder spec=...`."""
    return build_application(ClusterSpec.model_validate(args.get("spec", {})))


def wait_ready(timeout_s: float = 300.0) -> None:
    """Blocks until the application reports RUNNING."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        time.sleep(0.5)
    raise TimeoutError(f"application {APP_NAME} not running after {timeout_s} s")


__all__ = ["APP_NAME", "app_builder", "build_application", "ray", "wait_ready"]
