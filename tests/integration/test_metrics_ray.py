"""The Ray metrics backend on a real two-node local Ray cluster: every process's metrics come out
of its node's one metrics agent under the exact names the catalog (and so the dashboards) use."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest

from observability.catalog import BY_NAME

ray = pytest.importorskip("ray")


class _RecorderImpl:
    """A stand-in for any cluster process (replica, shard): records through the Ray backend."""

    def __init__(self, replica: str) -> None:
        from cluster.serving.metrics_ray import ray_metrics

        self.metrics = ray_metrics({"replica": replica})

    def record(self) -> tuple[str, str]:
        m = self.metrics
        m.engine_state(num_running=3, num_waiting=1, kv_usage={"full_attention": 0.25})
        m.prefix_cache(num_queried_tokens=64, num_hit_tokens=0)  # a 0 increment must not raise
        m.request_finished(finished_reason="stop", num_prompt_tokens=10, num_generation_tokens=4,
                           e2e_s=0.5, ttft_s=0.05, inter_token_s=[0.01, 0.02])  # fmt: skip
        context = ray.get_runtime_context()
        return str(context.get_node_id()), str(context.get_worker_id())


_Recorder: Any = ray.remote(num_cpus=0)(_RecorderImpl)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _samples(text: str, name: str, worker_id: str = "") -> list[str]:
    """Lines of `name`; with `worker_id`, only that process's (other tests' processes on the same
    session cluster export the same names)."""
    return [
        line
        for line in text.splitlines()
        if line.startswith(name + "{") and f'WorkerId="{worker_id}"' in line
    ]


def test_each_node_exports_its_processes_under_catalog_names(ray_cluster: Any) -> None:
    """Catches metrics that never reach the node's scrape target (e.g. a ':' in a name, which Ray
    2.60 drops silently), exported names drifting from `MetricDef.exported` (dashboards then show
    nothing), and a 0 increment crashing the recorder (Ray's Counter.inc rejects 0)."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    recorders = [
        _Recorder.options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False
            )
        ).remote(f"attention-{i}")
        for i, n in enumerate(nodes)
    ]
    recorded = ray.get([r.record.remote() for r in recorders])
    assert [node for node, _ in recorded] == [n["NodeID"] for n in nodes]
    workers = [worker for _, worker in recorded]

    running = BY_NAME["mimo_num_requests_running"].exported
    deadline = time.monotonic() + 40  # Ray's agents report every few seconds
    texts: list[str] = []
    while time.monotonic() < deadline:
        texts = [_scrape(n["MetricsExportPort"]) for n in nodes]
        if all(_samples(t, running, w) for t, w in zip(texts, workers, strict=True)) and all(
            _samples(t, "ray_mimo_time_to_first_token_seconds_count", w)
            for t, w in zip(texts, workers, strict=True)
        ):
            break
        time.sleep(1)
    for i, (text, worker) in enumerate(zip(texts, workers, strict=True)):
        # one node = one scrape target holding exactly its own process's series
        [line] = _samples(text, running, worker)
        assert f'replica="attention-{i}"' in line and line.endswith(" 3.0")
        [kv] = _samples(text, BY_NAME["mimo_kv_cache_usage_perc"].exported, worker)
        assert 'layer_type="full_attention"' in kv and kv.endswith(" 0.25")
        [queries] = _samples(text, "ray_mimo_prefix_cache_queries_total", worker)
        assert queries.endswith(" 64.0")
        assert _samples(text, "ray_mimo_prefix_cache_hits_total", worker) == []  # nothing recorded for 0
        [count] = _samples(text, "ray_mimo_inter_token_latency_seconds_count", worker)
        assert count.endswith(" 2.0")
        [reason] = _samples(text, BY_NAME["mimo_request_success"].exported, worker)
        assert 'finished_reason="stop"' in reason and reason.endswith(" 1.0")
        assert not [line for line in text.splitlines() if line.startswith(("mimo:", "ray_mimo:"))]
