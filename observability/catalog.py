"""The one table of metrics every part of the cluster records: name, kind, unit, labels, help.

Names follow vLLM's (`vllm:num_requests_running` -> `mimo_num_requests_running`) so existing
dashboards map by a prefix swap. Ray 2.60's metrics agent (OpenTelemetry) silently DROPS metric
names containing ':' (verified: `ray.util.metrics.Counter("mimo:x")` is never exported, and even
corrupts a same-named `mimo_x` histogram's sum), so the names use '_' where vLLM uses ':'.

Exported names, verified against a node's `/metrics` (Ray 2.60, `_metrics_export_port`):
Ray prefixes every application metric with `ray_` and counters get `_total`, so
`mimo_prompt_tokens` (counter) is scraped as `ray_mimo_prompt_tokens_total`, the gauge
`mimo_kv_cache_usage_perc` as `ray_mimo_kv_cache_usage_perc`, and the histogram
`mimo_time_to_first_token_seconds` as `ray_mimo_time_to_first_token_seconds_{bucket,sum,count}`.
Ray adds the labels Component, NodeAddress, SessionName, Version and WorkerId (one series per
process), so queries aggregate with `sum by (...)`. The prometheus-client backend exports the same
names (prefix `ray_`), so one set of dashboards serves both. `MetricDef.exported` is that name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

EXPORT_PREFIX = "ray_"  # what Ray's per-node metrics agent puts before every application metric


class Kind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


# seconds; the same edges vLLM uses for TTFT, trimmed at both ends
LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
INTER_TOKEN_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
DISPATCH_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True)
class MetricDef:
    name: str  # given to the backend; no prefix, no `_total`
    kind: Kind
    unit: str  # what one unit of the value is: "requests", "seconds", "tokens", "ratio", ...
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()  # histogram upper bounds, > 0 (Ray rejects 0), +Inf implied
    vllm_name: str | None = None  # the peer metric it stands for, when there is one

    @property
    def exported(self) -> str:
        """The name as scraped from a node (counters with `_total`; histograms add suffixes)."""
        return EXPORT_PREFIX + self.name + ("_total" if self.kind is Kind.COUNTER else "")

    @property
    def series(self) -> tuple[str, ...]:
        """Every series name a scrape shows for this metric."""
        if self.kind is Kind.HISTOGRAM:
            base = EXPORT_PREFIX + self.name
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (self.exported,)


def _c(name: str, unit: str, labels: tuple[str, ...], help: str, vllm: str | None = None) -> MetricDef:
    return MetricDef(name, Kind.COUNTER, unit, labels, help, vllm_name=vllm)


def _g(name: str, unit: str, labels: tuple[str, ...], help: str, vllm: str | None = None) -> MetricDef:
    return MetricDef(name, Kind.GAUGE, unit, labels, help, vllm_name=vllm)


def _h(name: str, buckets: tuple[float, ...], labels: tuple[str, ...], help: str, vllm: str | None = None) -> MetricDef:  # fmt: skip
    return MetricDef(name, Kind.HISTOGRAM, "seconds", labels, help, buckets, vllm)


CATALOG: tuple[MetricDef, ...] = (
    # gateway: one request's life, as the client sees it
    _c("mimo_http_requests", "requests", ("route", "status"), "HTTP requests answered, by route and status code"),
    _c("mimo_request_success", "requests", ("finished_reason",), "Requests finished, by finish reason (stop, length, abort, error)", "vllm:request_success_total"),
    _c("mimo_rate_limit_rejections", "requests", ("limit",), "Requests refused by a per-key limit (requests or tokens per minute)"),
    _c("mimo_prompt_tokens", "tokens", (), "Prompt tokens of finished requests", "vllm:prompt_tokens_total"),
    _c("mimo_generation_tokens", "tokens", (), "Generated tokens of finished requests", "vllm:generation_tokens_total"),
    _h("mimo_time_to_first_token_seconds", LATENCY_BUCKETS_S, (), "Time from request arrival to its first token", "vllm:time_to_first_token_seconds"),
    _h("mimo_inter_token_latency_seconds", INTER_TOKEN_BUCKETS_S, (), "Time between consecutive output chunks of one request", "vllm:inter_token_latency_seconds"),
    _h("mimo_e2e_request_latency_seconds", LATENCY_BUCKETS_S, (), "Time from request arrival to its last token", "vllm:e2e_request_latency_seconds"),
    _h("mimo_request_queue_time_seconds", LATENCY_BUCKETS_S, (), "Time a request waited before its first scheduled step", "vllm:request_queue_time_seconds"),
    # attention replica: the engine's state
    _g("mimo_num_requests_running", "requests", ("replica",), "Requests in the running batch of this replica", "vllm:num_requests_running"),
    _g("mimo_num_requests_waiting", "requests", ("replica",), "Requests waiting to be scheduled on this replica", "vllm:num_requests_waiting"),
    _g("mimo_kv_cache_usage_perc", "ratio", ("replica", "layer_type"), "Fraction (0..1) of KV blocks in use, per pool (full_attention, sliding_attention)", "vllm:kv_cache_usage_perc"),
    _c("mimo_prefix_cache_queries", "tokens", ("replica",), "Prompt tokens looked up in the prefix cache", "vllm:prefix_cache_queries_total"),
    _c("mimo_prefix_cache_hits", "tokens", ("replica",), "Prompt tokens found in the prefix cache", "vllm:prefix_cache_hits_total"),
    _c("mimo_num_preemptions", "requests", ("replica",), "Requests preempted (recomputed later) for lack of KV blocks", "vllm:num_preemptions_total"),
    _c("mimo_spec_decode_num_drafts", "steps", ("replica",), "Verify steps that carried MTP drafts", "vllm:spec_decode_num_drafts_total"),
    _c("mimo_spec_decode_num_draft_tokens", "tokens", ("replica",), "MTP draft tokens proposed", "vllm:spec_decode_num_draft_tokens_total"),
    _c("mimo_spec_decode_num_accepted_tokens", "tokens", ("replica",), "MTP draft tokens accepted", "vllm:spec_decode_num_accepted_tokens_total"),
    # experts: load per (layer, expert) and per shard, dispatch cost, balance
    _c("mimo_expert_tokens", "tokens", ("layer", "expert"), "Token rows routed to each (MoE layer, expert)"),
    _c("mimo_expert_shard_tokens", "tokens", ("shard",), "Token rows computed by each expert shard (all its experts)"),
    _g("mimo_expert_shard_busy_ratio", "ratio", ("shard",), "Fraction (0..1) of wall time the shard spent computing, last interval"),
    _h("mimo_expert_dispatch_seconds", DISPATCH_BUCKETS_S, ("transport",), "One MoE layer's dispatch: send rows to shards, wait, combine"),
    _g("mimo_eplb_balancedness", "ratio", (), "Mean over max tokens per shard of the hottest layer (1 = balanced)", "sglang:eplb_balancedness"),
    _c("mimo_eplb_rebalances", "events", (), "Expert placements moved by the load balancer"),
    # router: where each request went and the prefix it expected there
    _c("mimo_router_decisions", "requests", ("replica", "reason"), "Requests routed, by chosen replica and deciding factor (prefix, load, fallback)"),
    _c("mimo_router_expected_hit_tokens", "tokens", ("replica",), "Cached prompt tokens the router expected on the chosen replica"),
    _c("mimo_router_prompt_tokens", "tokens", ("replica",), "Prompt tokens routed (denominator of the expected hit rate)"),
    # autoscaling: what the policy decided and why
    _g("mimo_autoscaling_target_replicas", "replicas", ("pool",), "Replicas the autoscaling policy wants (pool = attention or experts)"),
    _c("mimo_autoscaling_decisions", "decisions", ("pool", "direction", "reason"), "Scaling changes made, by pool, direction (up, down) and reason"),
)  # fmt: skip

BY_NAME: Mapping[str, MetricDef] = {m.name: m for m in CATALOG}
BY_SERIES: Mapping[str, MetricDef] = {s: m for m in CATALOG for s in m.series}


def get(name: str) -> MetricDef:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is not in observability.catalog.CATALOG") from None
