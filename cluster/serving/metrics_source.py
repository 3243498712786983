"""Where the autoscaling policy's numbers come from: Prometheus (PromQL over HTTP) or Serve's own
in-process stats (what replicas return from `record_autoscaling_stats`).

Both produce the snapshots `cluster.autoscaling` decides on, or None when the data is missing
(no series, NaN, an HTTP error), which the decision treats as "hold". Metric names come from
`observability.catalog`, never spelled here, so a renamed metric breaks loudly in the tests.
"""

from __future__ import annotations

import json
import math
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.autoscaling import AttentionSnapshot, ExpertSnapshot
from observability.catalog import BY_NAME

_KV = BY_NAME["mimo_kv_cache_usage_perc"].exported
_WAITING = BY_NAME["mimo_num_requests_waiting"].exported
_RUNNING = BY_NAME["mimo_num_requests_running"].exported
_TTFT_BUCKET = BY_NAME["mimo_time_to_first_token_seconds"].series[0]
_BUSY = BY_NAME["mimo_expert_shard_busy_ratio"].exported

# one PromQL query per snapshot field; Ray exports one series per process (WorkerId label) and keeps
# exporting a dead process's last gauge values, so gauges are read only for the live replicas
# (`{sel}` becomes a `replica=~"..."` matcher); rates of counters need no filter (dead ones are flat)
_TEMPLATES: Mapping[str, str] = {
    "observed_s": f"max(timestamp({_RUNNING}{{sel}}))",
    "kv_usage": f"avg(max by (replica) ({_KV}{{sel}}))",
    "num_waiting": f"sum({_WAITING}{{sel}})",
    "num_running": f"sum({_RUNNING}{{sel}})",
    "ttft_p90_s": f"histogram_quantile(0.9, sum by (le) (rate({_TTFT_BUCKET}[1m])))",
    "expert_observed_s": f"max(timestamp({_BUSY}))",
    "expert_busy_ratio": f"avg({_BUSY})",
}


def promql(replicas: Sequence[str] | None = None) -> dict[str, str]:
    """The queries, restricted to `replicas` (Serve replica unique ids) when given."""
    sel = "" if not replicas else '{replica=~"' + "|".join(re.escape(r) for r in sorted(replicas)) + '"}'
    return {field: template.replace("{sel}", sel) for field, template in _TEMPLATES.items()}


PROMQL: Mapping[str, str] = promql()

# keys an Attention replica's `record_autoscaling_stats()` returns (floats; omit a key for no data)
STAT_KV_USAGE = "kv_usage"  # fullest pool's used fraction, 0..1
STAT_NUM_WAITING = "num_waiting"
STAT_NUM_RUNNING = "num_running"
STAT_TTFT_P90_S = "ttft_p90_s"  # over the replica's recent requests; omit when none finished
STAT_EXPERT_BUSY = "expert_busy_ratio"  # mean busy fraction of the shards it dispatches to


class PrometheusError(RuntimeError):
    """Prometheus answered, but not with a usable result (bad query, error status)."""


def query_prometheus(base_url: str, query: str, timeout_s: float = 2.0) -> float | None:
    """One instant query; the single value of its scalar or vector result, None for no data
    (empty vector or NaN/Inf, e.g. a quantile over no requests). Several series raise."""
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise PrometheusError(f"{query}: {body.get('error', body)}")
    data = body["data"]
    if data["resultType"] == "scalar":
        values = [data["result"]]
    elif data["resultType"] == "vector":
        values = [item["value"] for item in data["result"]]
    else:
        raise PrometheusError(f"{query}: unsupported result type {data['resultType']}")
    if len(values) > 1:
        raise PrometheusError(f"{query}: {len(values)} series, expected one")
    if not values:
        return None
    value = float(values[0][1])
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Snapshots:
    attention: AttentionSnapshot | None
    experts: ExpertSnapshot | None


def snapshots_from_values(values: Mapping[str, float | None]) -> Snapshots:
    """Snapshots from the PROMQL (or stats) fields; a pool missing any required field is None."""
    attention = None
    obs, kv, waiting, running = (
        values.get(k) for k in ("observed_s", "kv_usage", "num_waiting", "num_running")
    )
    if obs is not None and kv is not None and waiting is not None and running is not None:
        attention = AttentionSnapshot(obs, kv, waiting, running, values.get("ttft_p90_s"))
    experts = None
    eobs, busy = values.get("expert_observed_s"), values.get("expert_busy_ratio")
    if eobs is not None and busy is not None:
        experts = ExpertSnapshot(eobs, busy)
    return Snapshots(attention, experts)


class PrometheusSource:
    """Runs the PROMQL queries against one Prometheus; any failure makes that field None."""

    def __init__(self, base_url: str, timeout_s: float = 2.0, require_replicas: bool = False) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.replicas: tuple[str, ...] | None = None  # the live replicas; set by the policy each tick
        self.require_replicas = require_replicas  # no snapshot until `replicas` is known
        self.last_error: str | None = None

    def fetch(self) -> Snapshots:
        if self.require_replicas and self.replicas is None:
            return Snapshots(None, None)  # unfiltered gauges could be a dead application's
        values: dict[str, float | None] = {}
        self.last_error = None
        for field, query in promql(self.replicas).items():
            try:
                values[field] = query_prometheus(self.base_url, query, self.timeout_s)
            except (OSError, urllib.error.URLError, PrometheusError, ValueError, KeyError) as e:
                values[field] = None
                self.last_error = f"{field}: {e}"
        return snapshots_from_values(values)


class _Timestamped(Protocol):
    timestamp: float
    value: float


def snapshots_from_serve_stats(
    aggregated: Mapping[str, Mapping[Any, float]] | None,
    raw: Mapping[str, Mapping[Any, Sequence[_Timestamped]]] | None,
) -> Snapshots:
    """Snapshots from Serve's per-replica custom metrics (AutoscalingContext.aggregated_metrics,
    averaged over look_back_period_s, and raw_metrics for the newest timestamp). KV usage is the
    mean over replicas, queues are summed, TTFT is the worst replica's p90."""
    aggregated = aggregated or {}
    raw = raw or {}

    def per_replica(key: str) -> list[float]:
        return [v for v in aggregated.get(key, {}).values() if math.isfinite(v)]

    def newest(key: str) -> float | None:
        stamps = [p.timestamp for series in raw.get(key, {}).values() for p in series]
        return max(stamps) if stamps else None

    kv, waiting, running = (
        per_replica(STAT_KV_USAGE),
        per_replica(STAT_NUM_WAITING),
        per_replica(STAT_NUM_RUNNING),
    )
    ttft, busy = per_replica(STAT_TTFT_P90_S), per_replica(STAT_EXPERT_BUSY)
    values: dict[str, float | None] = {
        "observed_s": newest(STAT_KV_USAGE),
        "kv_usage": sum(kv) / len(kv) if kv else None,
        "num_waiting": sum(waiting) if waiting else None,
        "num_running": sum(running) if running else None,
        "ttft_p90_s": max(ttft) if ttft else None,
        "expert_observed_s": newest(STAT_EXPERT_BUSY),
        "expert_busy_ratio": sum(busy) / len(busy) if busy else None,
    }
    return snapshots_from_values(values)


class BackgroundPoller:
    """Calls `fetch` every `interval_s` on a daemon thread so the Serve controller's loop never
    waits on HTTP; `latest()` is the last result (None before the first one)."""

    def __init__(self, fetch: Callable[[], Snapshots], interval_s: float = 5.0) -> None:
        self._fetch = fetch
        self._interval_s = interval_s
        self._latest: Snapshots | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def latest(self) -> Snapshots | None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mimo-metrics-poller", daemon=True)
            self._thread.start()
        with self._lock:
            return self._latest

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            result = self._fetch()
            with self._lock:
                self._latest = result
            self._stop.wait(self._interval_s)
