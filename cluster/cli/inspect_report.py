"""`mimo inspect`: what a config implies, layers by type, parameters, KV bytes at a context length.

Pure arithmetic over `mimo.sizes`; the JSON keys are a stable interface for scripts and docs.
"""

from __future__ import annotations

from typing import Any

from mimo.config import LayerType, MiMoConfig
from mimo.sizes import kv_bytes_for_sequence, kv_bytes_per_token, param_counts


def inspect_report(config: MiMoConfig, context: int) -> dict[str, Any]:
    if context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    counts = param_counts(config)
    layers = {t.value: [i for i, lt in enumerate(config.layer_types) if lt is t] for t in LayerType}
    hybrid = kv_bytes_for_sequence(config, context)
    all_global = kv_bytes_for_sequence(config, context, hybrid=False)
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "layers": layers,
        "num_layers_by_type": {t: len(ids) for t, ids in layers.items()},
        "moe_layers": [i for i, m in enumerate(config.is_moe_layer) if m],
        "experts": {
            "n_routed_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "params_per_expert": counts.per_expert,
        },
        "num_mtp_layers": config.num_mtp_layers,
        "sliding_window_size": config.sliding_window_size,
        "rotary_dim": config.rotary_dim,
        "total_params": counts.total,
        "active_params": counts.active,
        "mtp_params": counts.mtp,
        "kv_dtype_bytes": 2,
        "kv_bytes_per_token": {t.value: kv_bytes_per_token(config.attention_for_type(t)) for t in LayerType},
        "context": context,
        "kv_bytes_hybrid": hybrid,
        "kv_bytes_all_global": all_global,
        "kv_all_global_over_hybrid": round(all_global / hybrid, 3),
    }


WEIGHT_BYTES = {"fp8": 1, "bf16": 2, "fp32": 4}


def deployment_memory(
    config: MiMoConfig,
    *,
    num_shards: int,
    num_redundant: int,
    weight_dtype: str,
    kv_seqs: int,
    context: int,
) -> dict[str, Any]:
    """Bytes per expert shard and per attention replica for a disaggregated deployment.

    A shard holds ceil((MoE layers x experts + redundant copies) / shards) experts; an attention
    replica holds everything else (embedding, attention, dense layer 0, routers, norms, lm_head, MTP)
    plus bf16 KV for `kv_seqs` sequences of `context` tokens in the hybrid layout. Routers and norms
    are counted at the weight dtype too (they are <0.1% of the total).
    """
    if num_shards < 1 or num_redundant < 0 or kv_seqs < 0:
        raise ValueError("--shards must be >= 1 and --redundant, --kv-seqs >= 0")
    if weight_dtype not in WEIGHT_BYTES:
        raise ValueError(f"--weight-dtype must be one of {sorted(WEIGHT_BYTES)}, got {weight_dtype!r}")
    counts = param_counts(config)
    wb = WEIGHT_BYTES[weight_dtype]
    num_moe = sum(config.is_moe_layer)
    experts_per_shard = -(-(num_moe * config.num_experts + num_redundant) // num_shards)
    dense_params = counts.total - counts.experts
    kv = kv_seqs * kv_bytes_for_sequence(config, context)
    return {
        "weight_dtype": weight_dtype,
        "num_shards": num_shards,
        "num_redundant_experts": num_redundant,
        "experts_per_shard": experts_per_shard,
        "bytes_per_expert_shard": experts_per_shard * counts.per_expert * wb,
        "attention_replica_weight_bytes": dense_params * wb,
        "attention_replica_kv_bytes": kv,
        "bytes_per_attention_replica": dense_params * wb + kv,
        "kv_seqs": kv_seqs,
    }


def render_text(report: dict[str, Any]) -> str:
    gib = 2**30
    layers = report["layers"]
    lines = [
        f"layers: {report['num_hidden_layers']} "
        f"(GA {len(layers['full_attention'])} at {layers['full_attention']}, "
        f"SWA {len(layers['sliding_attention'])}, window {report['sliding_window_size']})",
        f"experts: {report['experts']['n_routed_experts']} routed, top-{report['experts']['num_experts_per_tok']}, "
        f"{report['experts']['params_per_expert'] / 1e6:.2f}M params each",
        f"params: total {report['total_params'] / 1e9:.2f}B, active {report['active_params'] / 1e9:.2f}B, "
        f"MTP {report['mtp_params'] / 1e9:.3f}B ({report['num_mtp_layers']} blocks)",
        "KV bytes/token (bf16): " + ", ".join(f"{k} {v}" for k, v in report["kv_bytes_per_token"].items()),
        f"KV for one {report['context']}-token sequence: hybrid {report['kv_bytes_hybrid'] / gib:.3f} GiB, "
        f"all-global {report['kv_bytes_all_global'] / gib:.3f} GiB "
        f"({report['kv_all_global_over_hybrid']}x)",
    ]
    if "deployment" in report:
        d = report["deployment"]
        lines.append(
            f"deployment ({d['weight_dtype']} weights): {d['num_shards']} expert shards of "
            f"{d['experts_per_shard']} experts, {d['bytes_per_expert_shard'] / gib:.1f} GiB each; "
            f"attention replica {d['attention_replica_weight_bytes'] / gib:.1f} GiB weights + "
            f"{d['attention_replica_kv_bytes'] / gib:.1f} GiB KV ({d['kv_seqs']} x {report['context']} tokens)"
        )
    return "\n".join(lines)
