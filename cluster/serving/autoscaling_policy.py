"""The ONE adapter to Ray Serve 2.60's alpha application-level autoscaling policy API.

`MimoAutoscalingPolicy` is a class-callable policy: Serve instantiates it once in the controller
with `policy_kwargs` and calls it every control-loop tick with {DeploymentID: AutoscalingContext};
it returns ({DeploymentID: target replicas}, {DeploymentID: policy state}). It reads the metrics
(Prometheus through `cluster.serving.metrics_source.PromQL`, polled off-thread, else the replicas'
`record_autoscaling_stats`), asks `cluster.autoscaling` for decisions, and records them as metrics.

How the composition root (cluster/serving/app.py, the Serve config) plugs it in:

1. Attention deployment options: `autoscaling_config=attention_autoscaling_config(spec)` and NO
   `num_replicas` (Serve refuses both). It sets min/max/initial replicas from `spec.attention` and
   Serve's own `upscale_delay_s` / `downscale_delay_s` to 0: Serve still runs its delay logic on
   top of an application policy, and the delays, hysteresis and cooldown here must be the only
   ones. Deployments without `autoscaling_config` (the gateway) are not given to the policy.
2. The Attention replica class defines `record_autoscaling_stats(self) -> dict[str, float]`
   returning the `STAT_*` keys of `cluster.serving.metrics_source` (kv_usage, num_waiting, num_running,
   and ttft_p90_s / expert_busy_ratio when it has them; omit a key rather than send NaN).
3. The application entry of the Serve config carries
   `"autoscaling_policy": application_autoscaling_policy(spec, prometheus_url=...)`, i.e.
   {"policy_function": "cluster.serving.autoscaling_policy:MimoAutoscalingPolicy", "policy_kwargs": {...}}.
   In 2.60 ONLY the declarative path reads it: deploy with
   `ServeDeploySchema(applications=[ServeApplicationSchema(..., autoscaling_policy=...)])` through
   `cluster.serving.ray_private.start_serve(...).deploy_apps(config)` (what `serve deploy` does);
   `serve.run(app)` ignores application-level policies.

The expert pool is not scaled here: its shards are Ray actors owned by the `ExpertPool` deployment,
which measures their busy fraction itself and applies `cluster.autoscaling.decide_experts` with the
same `ScalingConfig` (`scaling_config(spec)`), so it needs no metrics round trip or named actor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from cluster.autoscaling import (
    Decision,
    PoolLimits,
    PoolState,
    ScalingConfig,
    decide_attention,
)
from cluster.serving.metrics_source import (
    BackgroundPoller,
    PrometheusSource,
    Snapshots,
    snapshots_from_serve_stats,
)
from observability.recorder import Metrics

if TYPE_CHECKING:
    from cluster.spec import ClusterSpec

logger = logging.getLogger("ray.serve")

POLICY_PATH = "cluster.serving.autoscaling_policy:MimoAutoscalingPolicy"
ATTENTION_DEPLOYMENT = "Attention"


def scaling_config_from_dict(d: dict[str, Any]) -> ScalingConfig:
    return ScalingConfig(
        **{**d, "attention": PoolLimits(**d["attention"]), "experts": PoolLimits(**d["experts"])}
    )


def scaling_config(spec: ClusterSpec) -> ScalingConfig:
    """The decision settings of both pools from the spec (shard bounds default to num_shards)."""
    a, x = spec.autoscaling, spec.experts
    return ScalingConfig(
        attention=PoolLimits(spec.attention.min_replicas, spec.attention.max_replicas),
        experts=PoolLimits(x.min_shards or x.num_shards, x.max_shards or x.num_shards),
        target_kv_usage=a.target_kv_usage,
        scale_down_kv_usage=a.scale_down_kv_usage,
        target_waiting_per_replica=a.target_waiting_per_replica,
        ttft_slo_s=a.ttft_slo_ms / 1000,
        expert_target_load=a.expert_target_load,
        expert_scale_down_load=a.expert_target_load / 2,
        upscale_delay_s=a.upscale_delay_s,
        downscale_delay_s=a.downscale_delay_s,
        cooldown_s=a.cooldown_s,
    )


def policy_kwargs(spec: ClusterSpec, *, prometheus_url: str | None = None) -> dict[str, Any]:
    """JSON-serialisable kwargs of MimoAutoscalingPolicy from the spec."""
    return {
        "scaling": asdict(scaling_config(spec)),
        "attention_deployment": ATTENTION_DEPLOYMENT,
        "prometheus_url": prometheus_url,
    }


def application_autoscaling_policy(spec: ClusterSpec, **kwargs: Any) -> dict[str, Any]:
    """The `autoscaling_policy` entry of the application in the Serve config."""
    return {"policy_function": POLICY_PATH, "policy_kwargs": policy_kwargs(spec, **kwargs)}


def attention_autoscaling_config(spec: ClusterSpec) -> dict[str, Any]:
    """The Attention deployment's `autoscaling_config` (Serve's own delays off; see module doc)."""
    return {
        "min_replicas": spec.attention.min_replicas,
        "max_replicas": spec.attention.max_replicas,
        "initial_replicas": spec.attention.num_replicas,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
    }


class MimoAutoscalingPolicy:
    def __init__(
        self,
        *,
        scaling: dict[str, Any],
        attention_deployment: str = ATTENTION_DEPLOYMENT,
        prometheus_url: str | None = None,
        poll_interval_s: float = 5.0,
        record_metrics: bool = True,
    ) -> None:
        self.config = scaling_config_from_dict(scaling)
        self.attention_deployment = attention_deployment
        self.source = PrometheusSource(prometheus_url, require_replicas=True) if prometheus_url else None
        self.poller = BackgroundPoller(self.source.fetch, poll_interval_s) if self.source else None
        self.metrics: Metrics | None = None
        self._record_metrics = record_metrics

    def _snapshots(self, ctx: Any) -> Snapshots:
        if self.source is not None:  # the next poll reads gauges of these replicas only
            running = getattr(ctx, "running_replicas", None) or []
            self.source.replicas = tuple(r.unique_id for r in running) or None
        polled = self.poller.latest() if self.poller else None
        served = snapshots_from_serve_stats(ctx.aggregated_metrics, ctx.raw_metrics)
        if polled is None:
            return served
        return Snapshots(polled.attention or served.attention, polled.experts or served.experts)

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int | float], dict[Any, dict[Any, Any]]]:
        decisions: dict[Any, int | float] = {}
        states: dict[Any, dict[Any, Any]] = {}
        for dep_id, ctx in contexts.items():
            if ctx.deployment_name != self.attention_deployment:
                states[dep_id] = dict(ctx.policy_state)
                continue
            now = ctx.current_time if ctx.current_time is not None else time.time()
            snaps = self._snapshots(ctx)
            previous = ctx.policy_state.get("mimo", {})
            current = ctx.target_num_replicas
            attn = decide_attention(
                snaps.attention, current, now, self.config, PoolState.from_dict(previous.get("attention"))
            )
            self._report("attention", current, attn)
            decisions[dep_id] = attn.target
            states[dep_id] = {"mimo": {"attention": attn.state.to_dict(), "last_reason": attn.reason}}
        return decisions, states

    def _report(self, pool: str, previous: int, d: Decision) -> None:
        if d.target != previous:
            logger.info("mimo autoscaling: %s %d -> %d (%s: %s)", pool, previous, d.target, d.cause, d.reason)
        if self._record_metrics and self.metrics is None:
            from cluster.serving.metrics_ray import ray_metrics

            self.metrics = ray_metrics()
        if self.metrics is not None:
            self.metrics.autoscaled(pool=pool, target=d.target, previous=previous, reason=d.cause)
