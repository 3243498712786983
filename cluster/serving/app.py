"""The Serve application built from a `ClusterSpec`: `Gateway` (OpenAI API ingress) -> `Attention`
(engine + KV cache per replica) -> expert shard actors owned by the `ExpertPool` deployment. With
`gateway.direct_streaming`, HAProxy -> `Attention` (the API in each replica; `RouteChooser` picks it).

`app_builder({"spec": ...})` is the import path of the rendered Serve config, which `serve deploy`,
KubeRay and `mimo serve` (`cluster/serving/deploy.py`) all deploy. Deployment options that belong to code
(resources, runtime env, the request router, autoscaling) are set here.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.serving.attention_deployment import AttentionDeployment, engine_config
from cluster.serving.autoscaling_policy import attention_autoscaling_config
from cluster.serving.direct_attention import DirectAttentionDeployment
from cluster.serving.expert_pool_deployment import ExpertPoolDeployment
from cluster.serving.gateway_deployment import APP_NAME, GatewayDeployment
from cluster.serving.ray_private import with_ingress_request_router
from cluster.serving.route_chooser import RouteChooser
from cluster.serving.serve_config import ROUTE_CHOOSER
from cluster.serving.shared_limits import MAX_ONGOING_CALLS, RATE_LIMITS, RateLimitsDeployment
from cluster.spec import ClusterSpec, SpecError

ROUTING_STATS_PERIOD_S = 0.5  # how often Serve polls each attention replica for its report
# zero-copy tensors through the object store; idle OpenMP threads sleep instead of spinning (on a
# shared CPU host spinning threads starved the shard a replica waits for: ~100 ms layer calls)
RUNTIME_ENV = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1", "OMP_WAIT_POLICY": "PASSIVE"}}


def check_engine_fits(spec: ClusterSpec) -> None:
    """Raises SpecError before anything is deployed (a replica would otherwise fail to start, forever):
    naming `engine.num_mtp_drafts` when the checkpoint has fewer MTP blocks than drafts (none when it
    was saved without MTP tensors, e.g. by transformers), and `engine.kv_cache_mib` when the KV budget
    cannot hold one sequence of the context. Reads config.json and, for drafts, the safetensors index."""
    from mimo.checkpoint import CheckpointError
    from mimo.config import ConfigError, MiMoConfig
    from mimo.weights import checkpoint_config
    from replicas.engine.engine_config import build_layout, mtp_shortfall

    if spec.model.generation_config == "auto":
        from mimo.generation_config import read_sampling_defaults

        try:
            read_sampling_defaults(spec.model.path)
        except ValueError as e:
            raise SpecError(
                "model.generation_config", f"{e} (or set model.generation_config: none)"
            ) from None
    path, drafts = spec.model.path, spec.engine.num_mtp_drafts
    try:  # whether MTP blocks exist is in the safetensors index; without drafts config.json suffices
        model = checkpoint_config(path) if drafts else MiMoConfig.from_file(f"{path}/config.json")
    except (ConfigError, CheckpointError) as e:
        raise SpecError("model.path", str(e)) from None
    shortfall = mtp_shortfall(drafts, model, path)
    if shortfall is not None:
        raise SpecError("engine.num_mtp_drafts", f"{drafts} drafts per step but {shortfall}")
    try:
        build_layout(model, engine_config(spec))
    except ValueError as e:
        raise SpecError(
            "engine.kv_cache_mib", f"{e} (raise kv_cache_mib or lower engine.max_model_len)"
        ) from None


def required_cpus(spec: ClusterSpec) -> float:
    """Logical CPUs the application reserves (a private local cluster is started with at least this)."""
    num_shards = spec.experts.num_shards if spec.experts.has_shard_actors else 0
    return spec.attention.max_replicas * spec.attention.num_cpus + num_shards * spec.experts.num_cpus


def fit_to_machine(spec: ClusterSpec, num_cpus: float) -> ClusterSpec:
    """The spec with `attention.max_replicas`, when the spec leaves it at its default, lowered to
    what `num_cpus` real CPUs hold beside the expert shards (never below `num_replicas`): the
    default ceiling of 4 replicas would otherwise put 4 engines and 2 shards on a 2-core laptop.
    A ceiling set in the spec is kept as written."""
    a = spec.attention
    if "max_replicas" in a.model_fields_set or a.num_cpus <= 0:
        return spec
    num_shards = spec.experts.num_shards if spec.experts.has_shard_actors else 0
    room = num_cpus - num_shards * spec.experts.num_cpus
    fits = max(a.num_replicas, int(room // a.num_cpus))
    if fits >= a.max_replicas:
        return spec
    return spec.model_copy(update={"attention": a.model_copy(update={"max_replicas": fits})})


def build_application(spec: ClusterSpec, request_router: RequestRouterConfig | None = None) -> Application:
    """`request_router` replaces the router the spec describes (benchmarks plug peers' routers in)."""
    check_engine_fits(spec)
    pool = None
    if spec.experts.has_shard_actors:
        pool = serve.deployment(name="ExpertPool", num_replicas=1, ray_actor_options={"num_cpus": 0})(
            ExpertPoolDeployment
        ).bind(spec)
    a = spec.attention
    scaling: dict[str, Any] = (
        {"autoscaling_config": attention_autoscaling_config(spec)}
        if spec.autoscaling.enabled
        else {"num_replicas": a.num_replicas}
    )
    direct = spec.gateway.direct_streaming
    limits = _shared_limits(spec)
    attention_options = serve.deployment(
        name="Attention",
        max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=spec.engine.max_queued_requests,
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus, "runtime_env": RUNTIME_ENV},
        **scaling,
        request_router_config=request_router or _router_config(spec),
    )
    attention = (
        attention_options(serve.ingress()(DirectAttentionDeployment)).bind(spec, pool, limits)
        if direct
        else attention_options(AttentionDeployment).bind(spec, pool)
    )
    if direct:  # HAProxy asks the chooser, then sends the request to that replica's own API
        chooser = serve.deployment(
            name=ROUTE_CHOOSER,
            max_ongoing_requests=spec.gateway.max_pending_requests,
            ray_actor_options={"num_cpus": 0},
        )(RouteChooser).bind(spec, attention)
        return with_ingress_request_router(attention, chooser)
    gateway = serve.deployment(
        name="Gateway",
        num_replicas=spec.gateway.num_replicas,
        max_ongoing_requests=spec.gateway.max_pending_requests,
        ray_actor_options={"num_cpus": 0},
    )(serve.ingress()(GatewayDeployment)).bind(spec, attention, pool, limits)
    return gateway


def _shared_limits(spec: ClusterSpec) -> Application | None:
    """The store of per-key limits every API-serving process shares (`cluster.serving.shared_limits`), when
    limits are set and more than one process serves the API; None keeps them in the one process."""
    g = spec.gateway
    if g.requests_per_minute is None and g.tokens_per_minute is None:
        return None
    if not g.direct_streaming and g.num_replicas == 1:
        return None
    return serve.deployment(
        name=RATE_LIMITS,
        num_replicas=1,
        max_ongoing_requests=MAX_ONGOING_CALLS,
        ray_actor_options={"num_cpus": 0},
    )(RateLimitsDeployment).bind(g.requests_per_minute, g.tokens_per_minute)


def _router_config(spec: ClusterSpec) -> RequestRouterConfig:
    from cluster.serving.request_router import ClusterRequestRouter
    from router.policy import RouterConfig
    from router.serve_adapter import make_request_router_config

    r, direct = spec.router, spec.gateway.direct_streaming
    config = RouterConfig(
        policy=r.policy,
        block_size=spec.engine.block_size,
        cost=r.cost,
        default_step_s=r.default_step_s,
        default_prefill_tokens_per_s=r.default_prefill_tokens_per_s,
        tie_break=r.tie_break,
        share_loads=r.share_loads,
        prefix_weight=r.prefix_weight,
        load_weight=r.load_weight,
        kv_weight=r.kv_weight,
        stale_after_s=r.stale_after_s,
        guess_ttl_s=r.guess_ttl_s,
        max_routing_wait_s=r.max_routing_wait_s,
        # several gateways (each with its own router) share their guesses; one has nobody to tell
        route_board=f"{APP_NAME}-route-board" if spec.gateway.num_replicas > 1 and not direct else "",
        # direct streaming: requests leave through HAProxy, so the router never sees them end
        load_source="reports" if direct else "handle",
    )
    return make_request_router_config(config, ROUTING_STATS_PERIOD_S, ClusterRequestRouter)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point of the Serve config (`serve deploy`, KubeRay, `mimo serve`)."""
    return build_application(ClusterSpec.model_validate(args.get("spec", {})))


__all__ = [
    "APP_NAME",
    "app_builder",
    "build_application",
    "check_engine_fits",
    "fit_to_machine",
    "required_cpus",
]
