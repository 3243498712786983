"""Builds small random MiMo checkpoints in hub format for tests (no trained weights needed).

`random_config_dict` is the release's layout at toy size; overrides change any hub field, so tests
exercise other head dims, windows, expert counts and shardings with the same loading code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mimo.checkpoint import write_checkpoint
from mimo.config import MiMoConfig
from mimo.config_export import to_hub_dict
from mimo.model import MiMoForCausalLM
from mimo.weights import hub_state_from_model


def random_config_dict(num_layers: int = 7, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model_type": "mimo_v2_flash",
        "vocab_size": 320,
        "hidden_size": 64,
        "num_hidden_layers": num_layers,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 48,
        "v_head_dim": 32,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "swa_head_dim": 48,
        "swa_v_head_dim": 32,
        "max_position_embeddings": 4096,
        "rope_theta": 5_000_000.0,
        "swa_rope_theta": 10_000.0,
        "partial_rotary_factor": 0.334,
        "attention_value_scale": 0.707,
        "add_full_attention_sink_bias": False,
        "add_swa_attention_sink_bias": True,
        "sliding_window_size": 8,
        "hybrid_layer_pattern": [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(num_layers)],
        "moe_layer_freq": [0] + [1] * (num_layers - 1),
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "layernorm_epsilon": 1e-5,
        "num_nextn_predict_layers": 3,
        "eos_token_id": [1],
    }
    config.update(overrides)
    return config


def random_model(config: MiMoConfig, seed: int = 0) -> MiMoForCausalLM:
    """Weights large enough that routing, sinks and every layer matter to the logits."""
    gen = torch.Generator().manual_seed(seed)
    model = MiMoForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("attention_sink_bias", "e_score_correction_bias")):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * (1.5 / p.shape[-1] ** 0.5))
    return model.eval()


def write_random_checkpoint(
    path: Path,
    config_dict: dict[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    quantization_config: dict[str, Any] | None = None,
    shard_for: Callable[[str], str] | None = None,
) -> MiMoForCausalLM:
    """Writes config.json + safetensors shards + index; returns the model that was written."""
    path.mkdir(parents=True, exist_ok=True)
    if quantization_config is not None:
        config_dict = {**config_dict, "quantization_config": quantization_config}
    config = MiMoConfig.from_hub_dict(config_dict)
    model = random_model(config, seed)
    state = {
        n: (t if n.endswith(("gate.weight", "e_score_correction_bias")) else t.to(dtype))
        for n, t in hub_state_from_model(model).items()
    }
    kwargs: dict[str, Any] = {"quantization_config": quantization_config}
    if shard_for is not None:
        kwargs["shard_for"] = shard_for
    write_checkpoint(path, state, **kwargs)
    (path / "config.json").write_text(json.dumps(to_hub_dict(config), indent=2))
    return model
