"""Prometheus Operator objects of a spec: one scrape target per Ray node and the alert rules.

Ray exports every node's metrics (its own and the ones our code records) on the metrics-export
port, prefixed `ray_`; a PodMonitor scrapes that port on every pod. Alerts cover the TTFT SLO's
error-budget burn (the SLO is `autoscaling.ttft_slo_ms` at p90), KV cache saturation, expert load
imbalance after rebalancing, and restarting pods (kube-state-metrics).
"""

from __future__ import annotations

from typing import Any

from cluster.spec import ClusterSpec
from observability import catalog

Obj = dict[str, Any]

# Names as Ray's metrics agent exports them, from the one metrics table.
TTFT = catalog.get("mimo_time_to_first_token_seconds")
KV_USAGE = catalog.get("mimo_kv_cache_usage_perc").exported  # fraction 0..1 per (replica, pool)
BALANCEDNESS = catalog.get("mimo_eplb_balancedness").exported  # mean/max shard load, hottest layer
POD_RESTARTS = "kube_pod_container_status_restarts_total"  # kube-state-metrics

SLO_QUANTILE = 0.9  # the TTFT SLO holds for 90% of requests: the error budget is 10%
KV_SATURATED = 0.9
MIN_BALANCEDNESS = 0.5
MAX_RESTARTS_PER_HOUR = 3
# (severity, burn rate, long window, short window, for): fast burn pages, slow burn warns
BURN_ALERTS = (("critical", 5.0, "1h", "5m", "2m"), ("warning", 2.0, "6h", "30m", "15m"))


def pod_monitor(spec: ClusterSpec, obj: Obj) -> Obj:
    """Scrape the `metrics` container port of every pod of the deployment."""
    selector = dict(obj["metadata"]["labels"])
    obj["spec"] = {
        "selector": {"matchLabels": selector},
        "podMetricsEndpoints": [
            {
                "port": "metrics",
                "path": "/metrics",
                "interval": "15s",
                "relabelings": [
                    {
                        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
                        "targetLabel": "component",
                    }
                ],
            }
        ],
    }
    return obj


def slo_bucket(slo_s: float) -> float:
    """The TTFT histogram's first bucket edge at or above the SLO. Requests between the SLO and
    that edge count as good: the burn alerts can only err on the quiet side."""
    edges = [b for b in TTFT.buckets if b >= slo_s]
    if not edges:
        raise ValueError(f"autoscaling.ttft_slo_ms: {slo_s * 1000:g} ms is above the TTFT histogram")
    return edges[0]


def _bad_fraction(edge_s: float, window: str) -> str:
    """Share of requests whose TTFT exceeded `edge_s` over `window`."""
    le = f"{edge_s:g}"
    # a regex on the label: "2.5" literally, and both "5" and "5.0" for the 5-second bucket
    le_re = le.replace(".", r"\\.") if "." in le else le + r"(\\.0)?"
    bucket, _, count = TTFT.series
    good = f'sum(rate({bucket}{{le=~"{le_re}"}}[{window}]))'
    return f"(1 - {good} / sum(rate({count}[{window}])))"


def prometheus_rule(spec: ClusterSpec, obj: Obj) -> Obj:
    edge_s = slo_bucket(spec.autoscaling.ttft_slo_ms / 1000)
    budget = round(1 - SLO_QUANTILE, 6)
    ns = spec.kubernetes.namespace
    rules: list[Obj] = []
    for severity, burn, long_w, short_w, for_s in BURN_ALERTS:
        expr = (
            f"{_bad_fraction(edge_s, long_w)} > {burn:g} * {budget:g}"
            f" and {_bad_fraction(edge_s, short_w)} > {burn:g} * {budget:g}"
        )
        rules.append(
            _alert(
                f"MimoTTFTBudgetBurn{'Fast' if severity == 'critical' else 'Slow'}",
                expr,
                for_s,
                severity,
                f"TTFT SLO ({spec.autoscaling.ttft_slo_ms:g} ms at p{SLO_QUANTILE * 100:g}, measured at the "
                f"{edge_s:g} s bucket) error budget burning {burn:g}x too fast over {long_w} and {short_w}",
            )
        )
    rules.append(
        _alert(
            "MimoKVCacheSaturated",
            f"avg(max by (replica) ({KV_USAGE})) > {KV_SATURATED:g}",
            "10m",
            "warning",
            f"attention replicas' KV caches average above {KV_SATURATED:.0%}: "
            "scale-up is blocked (max_replicas reached or no capacity)",
        )
    )
    rules.append(
        _alert(
            "MimoExpertImbalance",
            f"min({BALANCEDNESS}) < {MIN_BALANCEDNESS:g}",
            "15m",
            "warning",
            f"an MoE layer's hottest expert shard carries over {1 / MIN_BALANCEDNESS:g}x the mean load "
            "after rebalancing",
        )
    )
    rules.append(
        _alert(
            "MimoPodRestarting",
            f'increase({POD_RESTARTS}{{namespace="{ns}", pod=~"mimo-.*"}}[1h]) > {MAX_RESTARTS_PER_HOUR}',
            "5m",
            "warning",
            f"a pod of the deployment restarted more than {MAX_RESTARTS_PER_HOUR} times in an hour",
        )
    )
    obj["spec"] = {"groups": [{"name": "mimo-serve", "rules": rules}]}
    return obj


def _alert(name: str, expr: str, for_s: str, severity: str, summary: str) -> Obj:
    return {
        "alert": name,
        "expr": expr,
        "for": for_s,
        "labels": {"severity": severity},
        "annotations": {"summary": summary},
    }
