"""ClusterSpec: YAML in, frozen spec out; errors name the dotted field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.serving.attention_deployment import engine_config
from cluster.spec import EMBEDDED_MODEL, ClusterSpec, SpecError


def test_default_spec_serves_the_embedded_model_with_one_replica_and_two_shards() -> None:
    spec = ClusterSpec.load(None)
    assert spec.model.path == str(EMBEDDED_MODEL)
    assert (spec.attention.num_replicas, spec.experts.num_shards) == (1, 2)
    assert spec.experts.transport == "channel"
    assert (spec.gateway.host, spec.gateway.port) == ("127.0.0.1", 8000)


def test_yaml_overrides_nested_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "attention:\n  num_replicas: 3\n  max_replicas: 3\n"
        "engine:\n  num_mtp_drafts: 2\n  max_draft_batch: 4\n  long_prefill_chunk: 2048\n"
    )
    spec = ClusterSpec.load(path)
    assert spec.attention.num_replicas == 3
    assert spec.engine.num_mtp_drafts == 2
    config = engine_config(spec)  # what every attention replica's engine is built with
    assert (config.num_mtp_drafts, config.max_draft_batch, config.long_prefill_chunk) == (2, 4, 2048)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"engine": {"block_size": 0}}, "engine.block_size"),
        ({"engine": {"max_draft_batch": 0}}, "engine.max_draft_batch"),
        ({"attention": {"bogus": 1}}, "attention.bogus"),
        ({"experts": {"transport": "smoke"}}, "experts.transport"),
        ({"attention": {"num_replicas": 5, "max_replicas": 4}}, "attention"),
        ({"gateway": {"direct_streaming": True, "max_queue_wait_s": 5}}, "gateway.max_queue_wait_s"),
        ({"experts": {"transport": "local", "num_gpus": 1}}, "experts.num_gpus"),
        ({"experts": {"transport": "local", "num_redundant": 4}}, "experts.num_redundant"),
        ({"experts": {"transport": "local", "ping_pong": True}}, "experts.ping_pong"),
    ],
)
def test_bad_values_name_the_field(data: dict[str, object], field: str) -> None:
    """Catches errors that only say 'validation error' without the dotted path."""
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_dict(data)
    assert info.value.field == field


def test_spec_is_frozen() -> None:
    spec = ClusterSpec()
    with pytest.raises(ValueError):
        spec.engine.block_size = 8  # type: ignore[misc]


def test_default_autoscaling_ceiling_fits_the_machine() -> None:
    """Catches the default spec scaling to 4 attention replicas beside 2 expert shards on a
    2-core machine; a ceiling written in the spec is kept."""
    from cluster.serving.app import fit_to_machine

    default = ClusterSpec()
    assert default.attention.max_replicas == 4
    assert fit_to_machine(default, 2).attention.max_replicas == 1  # never below num_replicas
    assert fit_to_machine(default, 5).attention.max_replicas == 3  # 5 CPUs - 2 shards
    two = ClusterSpec.from_dict({"attention": {"num_replicas": 2, "min_replicas": 2}})
    assert fit_to_machine(two, 2).attention.max_replicas == 2
    assert fit_to_machine(default, 64) == default
    local = ClusterSpec.from_dict({"experts": {"transport": "local"}})
    assert fit_to_machine(local, 3).attention.max_replicas == 3
    chosen = ClusterSpec.from_dict({"attention": {"max_replicas": 4}})
    assert fit_to_machine(chosen, 2) == chosen


def test_ready_while_every_deployment_has_a_running_replica() -> None:
    """Catches /ready answering 503 while the autoscaler adds a replica or Serve restarts one,
    although every deployment still has one serving."""
    from cluster.serving.gateway_deployment import can_serve

    running = {"Gateway": {"RUNNING": 1}, "Attention": {"RUNNING": 2}, "ExpertPool": {"RUNNING": 1}}
    assert can_serve(running)
    assert can_serve(running | {"Attention": {"RUNNING": 1, "STARTING": 2}})  # upscaling
    assert can_serve(running | {"Attention": {"RUNNING": 1, "RECOVERING": 1}})  # one restarting
    assert not can_serve(running | {"Attention": {"STARTING": 2}})
    assert not can_serve(running | {"ExpertPool": {}})
    assert not can_serve({})
