"""Sizes derived from a MiMoConfig: parameter counts and KV-cache bytes, with no tensors built.

`mimo inspect`, the capacity planner and the KV cache manager all size things from here, so the
arithmetic lives once. KV counts follow the hybrid layout: GA layers keep every token, SWA layers
only the `window + 1` tokens a query can still see.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimo.config import AttentionShape, LayerType, MiMoConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # everything in the checkpoint, MTP blocks included
    active: int  # per token in the main model: dense path + top-k experts (MTP excluded)
    mtp: int
    embedding: int
    lm_head: int
    attention: int
    dense_mlp: int
    router: int
    experts: int
    per_expert: int
    norms: int


def attention_params(config: MiMoConfig, shape: AttentionShape) -> int:
    h = config.hidden_size
    q = h * shape.num_q_heads * shape.qk_head_dim
    k = h * shape.num_kv_heads * shape.qk_head_dim
    v = h * shape.num_kv_heads * shape.v_head_dim
    o = shape.num_q_heads * shape.v_head_dim * h
    return q + k + v + o + (shape.num_q_heads if shape.has_sink else 0)


def dense_mlp_params(config: MiMoConfig) -> int:
    return 3 * config.hidden_size * config.intermediate_size


def expert_params(config: MiMoConfig) -> int:
    return 3 * config.hidden_size * config.moe_intermediate_size


def mtp_block_params(config: MiMoConfig) -> int:
    h = config.hidden_size
    norms = 5 * h  # enorm, hnorm, input, pre-mlp, final
    return 2 * h * h + attention_params(config, config.mtp_attention) + dense_mlp_params(config) + norms


def param_counts(config: MiMoConfig) -> ParamCounts:
    h = config.hidden_size
    embedding = config.vocab_size * h
    lm_head = config.vocab_size * h
    attention = sum(attention_params(config, config.attention(i)) for i in range(config.num_hidden_layers))
    num_moe = sum(config.is_moe_layer)
    num_dense = config.num_hidden_layers - num_moe
    dense_mlp = num_dense * dense_mlp_params(config)
    router = num_moe * (config.num_experts * h + config.num_experts)
    per_expert = expert_params(config)
    experts = num_moe * config.num_experts * per_expert
    norms = (2 * config.num_hidden_layers + 1) * h
    mtp = config.num_mtp_layers * mtp_block_params(config)
    main = embedding + lm_head + attention + dense_mlp + router + experts + norms
    active_experts = num_moe * config.num_experts_per_tok * per_expert
    active = embedding + lm_head + attention + dense_mlp + router + norms + active_experts
    return ParamCounts(
        total=main + mtp,
        active=active,
        mtp=mtp,
        embedding=embedding,
        lm_head=lm_head,
        attention=attention,
        dense_mlp=dense_mlp,
        router=router,
        experts=experts,
        per_expert=per_expert,
        norms=norms,
    )


def kv_bytes_per_token(shape: AttentionShape, dtype_bytes: int = 2) -> int:
    """K and V bytes one token occupies in one layer of this attention type."""
    return shape.num_kv_heads * (shape.qk_head_dim + shape.v_head_dim) * dtype_bytes


def kv_tokens_kept(config: MiMoConfig, layer_type: LayerType, num_tokens: int) -> int:
    """Tokens a layer must keep for a sequence of `num_tokens` to decode its next token."""
    if layer_type is LayerType.FULL:
        return num_tokens
    return min(num_tokens, config.sliding_window_size + 1)


def kv_bytes_for_sequence(
    config: MiMoConfig, num_tokens: int, *, hybrid: bool = True, dtype_bytes: int = 2
) -> int:
    """KV bytes of one sequence over the main layers (MTP layers excluded).

    hybrid=False prices the same model as if every layer were global attention with the GA head
    layout, the baseline the technical report's "~6x less KV" compares against.
    """
    total = 0
    for layer_type in config.layer_types:
        if hybrid:
            shape = config.attention_for_type(layer_type)
            kept = kv_tokens_kept(config, layer_type, num_tokens)
        else:
            shape, kept = config.full_attention, num_tokens
        total += kept * kv_bytes_per_token(shape, dtype_bytes)
    return total
