"""The embedded tiny model's architecture: MiMo-V2-Flash's layout at laptop size.

Kept from the release: q/k head dim != v head dim, SWA KV heads = 2x GA (transformers derives them
so), sinks on SWA layers only, the layer-type rule (GA at i == 0 or (i+1) % 6 == 0, so layers 0
and 5 here), a dense layer 0, sigmoid noaux_tc routing, 3 MTP blocks, the release's rope thetas and
partial rotary factor. Shrunk: width, experts (16, top-4), window (64) and vocabulary (4096).
"""

from __future__ import annotations

from typing import Any

NUM_LAYERS = 6


def tiny_config_dict(vocab_size: int, eos_token_ids: list[int]) -> dict[str, Any]:
    return {
        "model_type": "mimo_v2_flash",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "num_hidden_layers": NUM_LAYERS,
        "intermediate_size": 512,
        "moe_intermediate_size": 96,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 48,
        "v_head_dim": 32,
        "swa_num_attention_heads": 8,
        "swa_num_key_value_heads": 4,
        "swa_head_dim": 48,
        "swa_v_head_dim": 32,
        "max_position_embeddings": 65536,
        "layernorm_epsilon": 1e-5,
        "rope_theta": 5_000_000.0,
        "swa_rope_theta": 10_000.0,
        "partial_rotary_factor": 0.334,
        "attention_value_scale": 0.707,
        "add_full_attention_sink_bias": False,
        "add_swa_attention_sink_bias": True,
        "sliding_window_size": 64,
        "hybrid_layer_pattern": [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(NUM_LAYERS)],
        "moe_layer_freq": [0] + [1] * (NUM_LAYERS - 1),
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": None,
        "num_nextn_predict_layers": 3,
        "torch_dtype": "bfloat16",
        "eos_token_id": eos_token_ids,
    }
