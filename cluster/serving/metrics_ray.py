"""Ray's `ray.util.metrics` as a backend of `observability.recorder.Metrics`.

Every Ray process on a node (Serve replicas, expert shards, the controller) records through its
raylet's metrics agent, so a node is ONE scrape target on `metrics_export_port` whatever the number
of processes. Exported names: `ray_` + name (+ `_total` for counters); see observability.catalog.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge, Histogram

from observability.catalog import Kind, MetricDef
from observability.recorder import Instrument, Metrics


class _RayInstrument:
    def __init__(self, metric: MetricDef) -> None:
        self.impl: Counter | Gauge | Histogram
        if metric.kind is Kind.COUNTER:
            self.impl = Counter(metric.name, metric.help, tag_keys=metric.labels)
        elif metric.kind is Kind.GAUGE:
            self.impl = Gauge(metric.name, metric.help, tag_keys=metric.labels)
        else:
            self.impl = Histogram(metric.name, metric.help, list(metric.buckets), tag_keys=metric.labels)

    def record(self, value: float, labels: Mapping[str, str]) -> None:
        tags = dict(labels)
        if isinstance(self.impl, Counter):
            self.impl.inc(value, tags=tags)
        elif isinstance(self.impl, Gauge):
            self.impl.set(value, tags=tags)
        else:
            self.impl.observe(value, tags=tags)


class RayBackend:
    def create(self, metric: MetricDef) -> Instrument:
        return _RayInstrument(metric)


def ray_metrics(constant_labels: Mapping[str, str] | None = None) -> Metrics:
    """The catalog on Ray's metrics agent; call inside the Ray process that records."""
    return Metrics(RayBackend(), constant_labels)
