"""Parsing hub config.json: the released config, derived sizes, and errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cluster.cli.inspect_report import inspect_report
from mimo.config import ConfigError, LayerType, MiMoConfig
from mimo.config_export import to_hub_dict
from tests.factory import random_config_dict

RELEASED = Path(__file__).resolve().parents[2] / "checkpoints" / "reference" / "mimo-v2-flash.config.json"


def released() -> dict[str, Any]:
    return json.loads(RELEASED.read_text())


def test_released_config_layout() -> None:
    """Catches a wrong layer-type rule, window, rotary dim or sink placement for the real model."""
    c = MiMoConfig.from_hub_dict(released())
    assert [i for i, t in enumerate(c.layer_types) if t is LayerType.FULL] == [
        0,
        5,
        11,
        17,
        23,
        29,
        35,
        41,
        47,
    ]
    assert c.is_moe_layer == (False,) + (True,) * 47
    assert c.rotary_dim == 64
    assert (c.full_attention.num_kv_heads, c.sliding_attention.num_kv_heads) == (4, 8)
    assert (c.full_attention.has_sink, c.sliding_attention.has_sink) == (False, True)
    assert (c.full_attention.window, c.sliding_attention.window) == (None, 128)
    assert (c.full_attention.rope_theta, c.sliding_attention.rope_theta) == (5_000_000.0, 10_000.0)
    assert c.routed_scaling_factor == 1.0 and c.num_mtp_layers == 3
    assert c.quantization is not None and c.quantization.weight_block_size == (128, 128)
    assert "model.layers.7.self_attn.o_proj" in c.quantization.ignored_layers


def test_released_inspect_numbers() -> None:
    """Catches parameter or KV arithmetic drifting from the report's 309B / 15B / ~5.3x figures."""
    r = inspect_report(MiMoConfig.from_hub_dict(released()), 262144)
    assert abs(r["total_params"] - 309e9) / 309e9 < 0.01
    assert abs(r["active_params"] - 15e9) < 1e9
    assert r["kv_bytes_per_token"] == {"full_attention": 2560, "sliding_attention": 5120}
    assert r["kv_bytes_all_global"] == 48 * 2560 * 262144
    assert r["kv_bytes_hybrid"] == 9 * 2560 * 262144 + 39 * 5120 * 129
    assert 5.2 < r["kv_all_global_over_hybrid"] < 5.4


def test_hub_dict_round_trip() -> None:
    """Catches to_hub_dict losing or renaming a field (training and tests write configs with it)."""
    c = MiMoConfig.from_hub_dict(released())
    assert MiMoConfig.from_hub_dict(to_hub_dict(c)) == c


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hybrid_layer_pattern": [0, 1, 1]}, "hybrid_layer_pattern"),
        ({"hybrid_layer_pattern": [0, 2, 1, 1, 1, 0, 1]}, "hybrid_layer_pattern"),
        ({"layer_types": ["full_attention"] * 7}, "layer_types"),
        ({"mlp_layer_types": ["sparse"] * 7}, "mlp_layer_types"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"swa_num_key_value_heads": 3}, "swa_num_key_value_heads"),
        ({"num_experts_per_tok": 17}, "num_experts_per_tok"),
        ({"sliding_window": 50}, "sliding_window"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"partial_rotary_factor": 0.01}, "partial_rotary_factor"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        (
            {"rope_parameters": {"full_attention": {"rope_theta": 1.0}}},
            "rope_parameters.full_attention.rope_theta",
        ),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_inconsistent_config_names_field(overrides: dict[str, Any], field: str) -> None:
    """Catches a bad config loading silently or failing with an error that hides the field."""
    with pytest.raises(ConfigError) as info:
        MiMoConfig.from_hub_dict(random_config_dict(**overrides))
    assert info.value.field == field
    assert field in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    """Catches a missing config.json surfacing as an obscure error."""
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        MiMoConfig.from_file(tmp_path)


def test_deployment_memory_for_the_release() -> None:
    """Catches sizing arithmetic that would mislead a GPU deployment (shard and replica bytes)."""
    from cluster.cli.inspect_report import deployment_memory

    config = MiMoConfig.from_hub_dict(released())
    d = deployment_memory(
        config, num_shards=8, num_redundant=32, weight_dtype="fp8", kv_seqs=16, context=65536
    )
    assert d["experts_per_shard"] == (47 * 256 + 32) // 8 == 1508
    assert d["bytes_per_expert_shard"] == 1508 * 3 * 4096 * 2048
    dense = 309_766_601_088 - 47 * 256 * 3 * 4096 * 2048
    assert d["attention_replica_weight_bytes"] == dense
    assert d["attention_replica_kv_bytes"] == 16 * (9 * 2560 * 65536 + 39 * 5120 * 129)
