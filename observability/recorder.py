"""`Metrics`: typed recording helpers over the catalog, on a pluggable backend.

Callers never spell a metric name: they call `metrics.request_finished(...)`, `metrics.engine_state(...)`
and so on, and the helpers check labels against `observability.catalog`. Two backends: this
module's `PrometheusBackend` (its own registry, for unit tests and standalone processes) and
`cluster.serving.metrics_ray.RayBackend` (Ray's per-node metrics agent: one scrape target per node), which
the composition root injects. Zero increments are skipped (Ray's `Counter.inc` rejects 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram

from observability.catalog import BY_NAME, CATALOG, EXPORT_PREFIX, Kind, MetricDef


class Instrument(Protocol):
    """One metric on one backend; `record` means inc (counter), set (gauge) or observe (histogram)."""

    def record(self, value: float, labels: Mapping[str, str]) -> None: ...


class Backend(Protocol):
    def create(self, metric: MetricDef) -> Instrument: ...


class _PromInstrument:
    def __init__(self, metric: MetricDef, registry: CollectorRegistry, prefix: str) -> None:
        name = prefix + metric.name
        labels = list(metric.labels)
        self.kind = metric.kind
        self.has_labels = bool(labels)
        self.impl: PromCounter | PromGauge | PromHistogram
        if metric.kind is Kind.COUNTER:
            self.impl = PromCounter(name, metric.help, labels, registry=registry)
        elif metric.kind is Kind.GAUGE:
            self.impl = PromGauge(name, metric.help, labels, registry=registry)
        else:
            self.impl = PromHistogram(name, metric.help, labels, registry=registry, buckets=metric.buckets)

    def record(self, value: float, labels: Mapping[str, str]) -> None:
        target = self.impl.labels(**labels) if self.has_labels else self.impl
        if isinstance(target, PromCounter):
            target.inc(value)
        elif isinstance(target, PromGauge):
            target.set(value)
        else:
            target.observe(value)


class PrometheusBackend:
    """prometheus-client with its own registry; names carry the `ray_` prefix so the exposition
    equals what Ray's node agent exports and one set of dashboards serves both backends."""

    def __init__(self, prefix: str = EXPORT_PREFIX) -> None:
        self.registry = CollectorRegistry()
        self.prefix = prefix

    def create(self, metric: MetricDef) -> Instrument:
        return _PromInstrument(metric, self.registry, self.prefix)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serves `/metrics` from a daemon thread (a standalone process's own scrape target)."""
        start_http_server(port, addr=addr, registry=self.registry)


class Metrics:
    """The catalog's metrics on one backend; `constant_labels` (e.g. {"replica": "attention-0"})
    fill the labels a metric declares and the caller does not pass."""

    def __init__(
        self,
        backend: Backend,
        constant_labels: Mapping[str, str] | None = None,
        catalog: Iterable[MetricDef] = CATALOG,
    ) -> None:
        self.constant_labels = dict(constant_labels or {})
        self._defs = {m.name: m for m in catalog}
        self._instruments = {name: backend.create(m) for name, m in self._defs.items()}

    # -- the one generic path every helper goes through -------------------------------------
    def record(self, name: str, value: float, **labels: str | int) -> None:
        metric = self._defs.get(name) or BY_NAME[name]
        if metric.kind is Kind.COUNTER:
            if value < 0:
                raise ValueError(f"{name}: counters only go up, got {value}")
            if value == 0:
                return
        full = {k: str(v) for k, v in labels.items()}
        for key in metric.labels:
            if key not in full and key in self.constant_labels:
                full[key] = self.constant_labels[key]
        if set(full) != set(metric.labels):
            raise ValueError(f"{name}: labels must be {sorted(metric.labels)}, got {sorted(full)}")
        self._instruments[name].record(float(value), full)

    # -- gateway ----------------------------------------------------------------------------
    def http_request(self, route: str, status: int) -> None:
        self.record("mimo_http_requests", 1, route=route, status=status)

    def rate_limited(self, limit: str) -> None:
        """limit: "requests" or "tokens" (per minute, per key)."""
        self.record("mimo_rate_limit_rejections", 1, limit=limit)

    def request_finished(
        self,
        *,
        finished_reason: str,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        e2e_s: float,
        ttft_s: float | None,
        queue_s: float | None = None,
        inter_token_s: Iterable[float] = (),
    ) -> None:
        self.record("mimo_request_success", 1, finished_reason=finished_reason)
        self.record("mimo_prompt_tokens", num_prompt_tokens)
        self.record("mimo_generation_tokens", num_generation_tokens)
        self.record("mimo_e2e_request_latency_seconds", e2e_s)
        if ttft_s is not None:
            self.record("mimo_time_to_first_token_seconds", ttft_s)
        if queue_s is not None:
            self.record("mimo_request_queue_time_seconds", queue_s)
        for gap in inter_token_s:
            self.record("mimo_inter_token_latency_seconds", gap)

    # -- attention replica ------------------------------------------------------------------
    def engine_state(self, *, num_running: int, num_waiting: int, kv_usage: Mapping[str, float]) -> None:
        """kv_usage: used fraction per pool, keyed by layer type (full_attention, sliding_attention)."""
        self.record("mimo_num_requests_running", num_running)
        self.record("mimo_num_requests_waiting", num_waiting)
        for layer_type, used in kv_usage.items():
            self.record("mimo_kv_cache_usage_perc", used, layer_type=layer_type)

    def prefix_cache(self, *, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.record("mimo_prefix_cache_queries", num_queried_tokens)
        self.record("mimo_prefix_cache_hits", num_hit_tokens)

    def preempted(self, num_requests: int = 1) -> None:
        self.record("mimo_num_preemptions", num_requests)

    def spec_decode(self, *, num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.record("mimo_spec_decode_num_drafts", num_drafts)
        self.record("mimo_spec_decode_num_draft_tokens", num_draft_tokens)
        self.record("mimo_spec_decode_num_accepted_tokens", num_accepted_tokens)

    # -- experts ----------------------------------------------------------------------------
    def expert_tokens(self, counts: Mapping[tuple[int, int], int]) -> None:
        """counts: token rows per (layer, expert) since the last call."""
        for (layer, expert), n in counts.items():
            self.record("mimo_expert_tokens", n, layer=layer, expert=expert)

    def shard_load(self, *, shard: int, num_tokens: int, busy_ratio: float) -> None:
        self.record("mimo_expert_shard_tokens", num_tokens, shard=shard)
        self.record("mimo_expert_shard_busy_ratio", busy_ratio, shard=shard)

    def dispatch(self, seconds: float, transport: str) -> None:
        self.record("mimo_expert_dispatch_seconds", seconds, transport=transport)

    def eplb(self, balancedness: float, rebalanced: bool = False) -> None:
        self.record("mimo_eplb_balancedness", balancedness)
        if rebalanced:
            self.record("mimo_eplb_rebalances", 1)

    # -- router -----------------------------------------------------------------------------
    def routed(
        self, *, replica: str, reason: str, num_prompt_tokens: int, num_expected_hit_tokens: int
    ) -> None:
        self.record("mimo_router_decisions", 1, replica=replica, reason=reason)
        self.record("mimo_router_prompt_tokens", num_prompt_tokens, replica=replica)
        self.record("mimo_router_expected_hit_tokens", num_expected_hit_tokens, replica=replica)

    # -- autoscaling ------------------------------------------------------------------------
    def autoscaled(self, *, pool: str, target: int, previous: int, reason: str) -> None:
        self.record("mimo_autoscaling_target_replicas", target, pool=pool)
        if target != previous:
            direction = "up" if target > previous else "down"
            self.record("mimo_autoscaling_decisions", 1, pool=pool, direction=direction, reason=reason)
