"""The metric catalog (observability/catalog.py) and the recorder over prometheus-client
(observability/recorder.py): names Ray can export, vLLM's semantics, and exact exposition."""

from __future__ import annotations

import re

import pytest

from observability.catalog import CATALOG, Kind
from observability.recorder import Metrics, PrometheusBackend


def test_catalog_names_are_exportable_and_follow_vllm() -> None:
    """Catches a name Ray 2.60 silently drops (':' or invalid characters), a duplicate, bad
    histogram buckets (Ray rejects <= 0), and a metric whose name drifts from the vLLM metric it
    stands for (dashboards map vllm:X to ray_mimo_X by a prefix swap)."""
    names = [m.name for m in CATALOG]
    assert len(names) == len(set(names))
    for m in CATALOG:
        assert re.fullmatch(r"mimo_[a-z0-9_]+", m.name), m.name
        assert all(re.fullmatch(r"[a-z_]+", label) for label in m.labels), m.labels
        assert m.help and m.unit
        if m.kind is Kind.HISTOGRAM:
            assert m.buckets and m.buckets[0] > 0 and list(m.buckets) == sorted(set(m.buckets))
            assert m.name.endswith("_seconds") and m.unit == "seconds"
        else:
            assert m.buckets == ()
        if m.vllm_name and m.vllm_name.startswith("vllm:"):
            suffix = "_total" if m.kind is Kind.COUNTER else ""
            assert m.vllm_name == "vllm:" + m.name.removeprefix("mimo_") + suffix
            assert m.exported == "ray_" + m.name + suffix


def test_recorder_exposition_is_exact() -> None:
    """Catches helpers writing the wrong metric or label, constant labels not filled in, exported
    names differing from MetricDef.exported, and zero increments recorded as series."""
    backend = PrometheusBackend()
    metrics = Metrics(backend, {"replica": "attention-0"})
    metrics.engine_state(
        num_running=3, num_waiting=2, kv_usage={"full_attention": 0.5, "sliding_attention": 0.25}
    )
    metrics.prefix_cache(num_queried_tokens=64, num_hit_tokens=0)
    metrics.request_finished(finished_reason="length", num_prompt_tokens=10, num_generation_tokens=5,
                             e2e_s=0.3, ttft_s=0.03, queue_s=0.001, inter_token_s=[0.002, 0.02])  # fmt: skip
    metrics.expert_tokens({(1, 7): 12, (2, 0): 3})
    metrics.routed(replica="attention-1", reason="prefix", num_prompt_tokens=80, num_expected_hit_tokens=64)
    text = backend.exposition()
    lines = set(text.splitlines())
    for expected in (
        'ray_mimo_num_requests_running{replica="attention-0"} 3.0',
        'ray_mimo_num_requests_waiting{replica="attention-0"} 2.0',
        'ray_mimo_kv_cache_usage_perc{layer_type="full_attention",replica="attention-0"} 0.5',
        'ray_mimo_kv_cache_usage_perc{layer_type="sliding_attention",replica="attention-0"} 0.25',
        'ray_mimo_prefix_cache_queries_total{replica="attention-0"} 64.0',
        'ray_mimo_request_success_total{finished_reason="length"} 1.0',
        "ray_mimo_prompt_tokens_total 10.0",
        "ray_mimo_generation_tokens_total 5.0",
        'ray_mimo_time_to_first_token_seconds_bucket{le="0.04"} 1.0',
        'ray_mimo_time_to_first_token_seconds_bucket{le="0.02"} 0.0',
        "ray_mimo_inter_token_latency_seconds_count 2.0",
        'ray_mimo_inter_token_latency_seconds_bucket{le="0.0025"} 1.0',
        'ray_mimo_expert_tokens_total{expert="7",layer="1"} 12.0',
        'ray_mimo_router_expected_hit_tokens_total{replica="attention-1"} 64.0',
        'ray_mimo_router_decisions_total{reason="prefix",replica="attention-1"} 1.0',
    ):
        assert expected in lines, expected
    assert "ray_mimo_prefix_cache_hits_total{" not in text  # a 0 increment makes no series


def test_recorder_rejects_wrong_labels_and_negative_counts() -> None:
    """Catches label mistakes passing silently (a series no dashboard reads) and counters that
    go down."""
    metrics = Metrics(PrometheusBackend())
    with pytest.raises(ValueError, match="labels must be"):
        metrics.engine_state(num_running=1, num_waiting=0, kv_usage={})  # no replica label anywhere
    with pytest.raises(ValueError, match="only go up"):
        metrics.prefix_cache(num_queried_tokens=-1, num_hit_tokens=0)
    with pytest.raises(KeyError):
        metrics.record("mimo_no_such_metric", 1)
