"""MiMoConfig -> hub config.json, carrying transformers' field names beside the release's.

transformers 5.23 reads `layer_types`, `mlp_layer_types`, `rope_parameters` and `rms_norm_eps`
from hard-coded defaults when they are absent, so configs we write state both schemes, consistent,
and the reference implementation reads exactly the model we do.
"""

from __future__ import annotations

from typing import Any

from mimo.config import MODEL_TYPE, LayerType, MiMoConfig


def to_hub_dict(config: MiMoConfig) -> dict[str, Any]:
    """The hub config.json, also carrying transformers' names so both read the same model."""
    full, swa = config.full_attention, config.sliding_attention
    out: dict[str, Any] = {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "intermediate_size": config.intermediate_size,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_attention_heads": full.num_q_heads,
        "num_key_value_heads": full.num_kv_heads,
        "head_dim": full.qk_head_dim,
        "v_head_dim": full.v_head_dim,
        "swa_num_attention_heads": swa.num_q_heads,
        "swa_num_key_value_heads": swa.num_kv_heads,
        "swa_head_dim": swa.qk_head_dim,
        "swa_v_head_dim": swa.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "layernorm_epsilon": config.rms_norm_eps,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": False,
        "rope_theta": full.rope_theta,
        "swa_rope_theta": swa.rope_theta,
        "partial_rotary_factor": config.partial_rotary_factor,
        "rope_parameters": {
            t.value: {
                "rope_type": "default",
                "rope_theta": config.attention_for_type(t).rope_theta,
                "partial_rotary_factor": config.partial_rotary_factor,
            }
            for t in LayerType
        },
        "attention_bias": False,
        "attention_value_scale": config.attention_value_scale,
        "add_full_attention_sink_bias": full.has_sink,
        "add_swa_attention_sink_bias": swa.has_sink,
        "sliding_window": config.sliding_window_size,
        "sliding_window_size": config.sliding_window_size,
        "hybrid_layer_pattern": [0 if t is LayerType.FULL else 1 for t in config.layer_types],
        "layer_types": [t.value for t in config.layer_types],
        "moe_layer_freq": [int(m) for m in config.is_moe_layer],
        "mlp_layer_types": ["sparse" if m else "dense" for m in config.is_moe_layer],
        "n_routed_experts": config.num_experts,
        "n_shared_experts": None,
        "num_experts_per_tok": config.num_experts_per_tok,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": config.n_group,
        "topk_group": config.topk_group,
        "norm_topk_prob": config.norm_topk_prob,
        "routed_scaling_factor": config.routed_scaling_factor,
        "num_nextn_predict_layers": config.num_mtp_layers,
        "torch_dtype": config.torch_dtype,
        "eos_token_id": list(config.eos_token_id)
        if len(config.eos_token_id) != 1
        else config.eos_token_id[0],
    }
    if config.quantization is not None:
        q = config.quantization
        out["quantization_config"] = {
            "quant_method": q.quant_method,
            "fmt": q.fmt,
            "activation_scheme": "dynamic",
            "weight_block_size": list(q.weight_block_size),
            "ignored_layers": sorted(q.ignored_layers),
        }
    return out
