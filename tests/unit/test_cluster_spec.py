"""ClusterSpec: YAML in, frozen spec out; errors name the dotted field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.attention_deployment import engine_config
from cluster.spec import EMBEDDED_MODEL, ClusterSpec, SpecError


def test_default_spec_serves_the_embedded_model_with_two_replicas_and_two_shards() -> None:
    spec = ClusterSpec.load(None)
    assert spec.model.path == str(EMBEDDED_MODEL)
    assert (spec.attention.num_replicas, spec.experts.num_shards) == (2, 2)
    assert (spec.gateway.host, spec.gateway.port) == ("127.0.0.1", 8000)


def test_yaml_overrides_nested_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "attention:\n  num_replicas: 3\n  max_replicas: 3\n"
        "engine:\n  num_mtp_drafts: 2\n  max_draft_batch: 4\n"
    )
    spec = ClusterSpec.load(path)
    assert spec.attention.num_replicas == 3
    assert spec.engine.num_mtp_drafts == 2
    config = engine_config(spec)  # what every attention replica's engine is built with
    assert (config.num_mtp_drafts, config.max_draft_batch) == (2, 4)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"engine": {"block_size": 0}}, "engine.block_size"),
        ({"engine": {"max_draft_batch": 0}}, "engine.max_draft_batch"),
        ({"attention": {"bogus": 1}}, "attention.bogus"),
        ({"experts": {"transport": "smoke"}}, "experts.transport"),
        ({"attention": {"num_replicas": 5, "max_replicas": 4}}, "attention"),
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
