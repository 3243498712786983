"""The Serve adapter (cluster/serving/autoscaling_policy.py) driven the way Serve 2.60's controller
drives an application-level policy: real `AutoscalingContext`s, wrapped by Serve's own
`_apply_app_level_autoscaling_config` (delays and bounds), metrics from the replicas'
`record_autoscaling_stats` as Serve aggregates them, and a Prometheus HTTP endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.serving.autoscaling_policy import (
    MimoAutoscalingPolicy,
    application_autoscaling_policy,
    attention_autoscaling_config,
)
from cluster.serving.metrics_source import PROMQL, PrometheusSource, query_prometheus
from cluster.spec import ClusterSpec
from observability.recorder import Metrics, PrometheusBackend

ATTN = DeploymentID(name="Attention", app_name="mimo")
GATEWAY = DeploymentID(name="Gateway", app_name="mimo")
SPEC = ClusterSpec.from_dict({"attention": {"num_replicas": 1, "min_replicas": 1, "max_replicas": 3},
                              "autoscaling": {"upscale_delay_s": 10, "downscale_delay_s": 60}})  # fmt: skip


def _ctx(
    dep: DeploymentID, target: int, now: float, state: dict[str, Any], stats: dict[str, float]
) -> AutoscalingContext:
    replicas = [ReplicaID(f"r{i}", dep) for i in range(target)]
    config = AutoscalingConfig(**attention_autoscaling_config(SPEC))
    return AutoscalingContext(
        deployment_id=dep, deployment_name=dep.name, app_name=dep.app_name, current_num_replicas=target,
        target_num_replicas=target, running_replicas=replicas, total_num_requests=1.0, total_queued_requests=0.0,
        aggregated_metrics={k: {r: v for r in replicas} for k, v in stats.items()},
        raw_metrics={k: {r: [TimeStampedValue(now - 1, v)] for r in replicas} for k, v in stats.items()},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3, policy_state=state,
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config,
    )  # fmt: skip


def test_policy_scales_attention_through_serves_wrapper() -> None:
    """Catches an adapter that does not fit Serve's app-level contract (keys, state shape, the
    wrapper's delay logic re-delaying ours) or that drops its state between ticks: KV 0.9 on one
    replica must give 2 replicas exactly after the 10 s upscale delay, and the gateway (no
    decision from us) keeps its state untouched."""
    kwargs = application_autoscaling_policy(SPEC)["policy_kwargs"]
    json.dumps(kwargs)  # Serve requires JSON-serialisable policy_kwargs
    policy = MimoAutoscalingPolicy(**{**kwargs, "record_metrics": False})
    backend = PrometheusBackend()
    policy.metrics = Metrics(backend)
    wrapped = _apply_app_level_autoscaling_config(policy)
    target = 1
    states: dict[Any, dict[Any, Any]] = {ATTN: {}, GATEWAY: {"keep": 1}}
    history = []
    for t in range(0, 30, 5):
        stats = {"kv_usage": 0.9 / target, "num_waiting": 0.0, "num_running": 4.0 / target}
        contexts = {
            ATTN: _ctx(ATTN, target, 1000.0 + t, states[ATTN], stats),
            GATEWAY: _ctx(GATEWAY, 1, 1000.0 + t, states[GATEWAY], {}),
        }
        decisions, states = wrapped(contexts)
        assert set(decisions) == {ATTN}
        target = decisions[ATTN]
        history.append(target)
    assert history == [1, 1, 2, 2, 2, 2]
    assert states[GATEWAY]["keep"] == 1
    exposition = backend.exposition()
    assert (
        'ray_mimo_autoscaling_decisions_total{direction="up",pool="attention",reason="kv"} 1.0' in exposition
    )
    assert 'ray_mimo_autoscaling_target_replicas{pool="attention"} 2.0' in exposition


def test_missing_replica_stats_hold_through_serve() -> None:
    """Catches treating 'no record_autoscaling_stats yet' (new replicas) as zero load and scaling
    down: with no custom metrics the decision holds at the current target."""
    policy = MimoAutoscalingPolicy(
        **{**application_autoscaling_policy(SPEC)["policy_kwargs"], "record_metrics": False}
    )
    wrapped = _apply_app_level_autoscaling_config(policy)
    decisions, states = wrapped({ATTN: _ctx(ATTN, 2, 1000.0, {}, {})})
    assert decisions == {ATTN: 2}
    assert states[ATTN]["mimo"]["last_reason"] == "no metrics: hold"


class _FakePrometheus(BaseHTTPRequestHandler):
    """Answers /api/v1/query like Prometheus does, from a dict of query -> result JSON."""

    answers: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)["query"][0]
        body = json.dumps(
            self.answers.get(query, {"status": "success", "data": {"resultType": "vector", "result": []}})
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _vector(value: str, ts: float = 1000.0) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [ts, value]}]},
    }


def test_promql_source_parses_values_nan_and_errors(prometheus: str) -> None:
    """Catches a NaN TTFT quantile (zero traffic) read as a number, a missing series read as 0,
    and a Prometheus error answer crashing the policy instead of holding."""
    _FakePrometheus.answers = {
        PROMQL["observed_s"]: _vector("995.5"),
        PROMQL["kv_usage"]: _vector("0.42"),
        PROMQL["num_waiting"]: _vector("3"),
        PROMQL["num_running"]: _vector("7"),
        PROMQL["ttft_p90_s"]: _vector("NaN"),
        PROMQL["expert_busy_ratio"]: {"status": "error", "error": "bad query"},
    }
    assert query_prometheus(prometheus, PROMQL["kv_usage"]) == 0.42
    assert query_prometheus(prometheus, "absent_metric") is None
    source = PrometheusSource(prometheus)
    snaps = source.fetch()
    assert snaps.attention is not None
    assert (snaps.attention.observed_s, snaps.attention.kv_usage, snaps.attention.num_waiting) == (
        995.5,
        0.42,
        3.0,
    )
    assert snaps.attention.num_running == 7.0 and snaps.attention.ttft_p90_s is None
    assert snaps.experts is None and source.last_error is not None and "bad query" in source.last_error
    _FakePrometheus.answers = {}
    assert PrometheusSource(prometheus).fetch().attention is None
    assert PrometheusSource("http://127.0.0.1:9").fetch().attention is None  # nothing listening


def test_gauges_are_read_for_the_live_replicas_only() -> None:
    """Catches the policy summing a dead replica's last exported gauges (Ray keeps exporting them):
    a killed replica's `running 3` would block every scale-down."""
    from cluster.serving.metrics_source import promql

    queries = promql(["r2", "r1"])
    assert queries["num_waiting"] == 'sum(ray_mimo_num_requests_waiting{replica=~"r1|r2"})'
    assert queries["kv_usage"] == 'avg(max by (replica) (ray_mimo_kv_cache_usage_perc{replica=~"r1|r2"}))'
    assert queries["ttft_p90_s"] == PROMQL["ttft_p90_s"]  # a rate: dead counters are flat
    assert promql(None) == dict(PROMQL)
