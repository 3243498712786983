"""`mimo plan`: builds the capacity model's inputs (model numbers from `mimo.sizes`, YAML/JSON
traffic and hardware profiles), runs `observability.capacity.plan` and renders text, JSON and a
PNG chart of cost against load (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from mimo.config import LayerType, MiMoConfig
from mimo.sizes import param_counts
from observability.capacity import GB, Hardware, Lengths, ModelNumbers, Plan, Traffic, cost_curve

PROFILES = Path(__file__).resolve().parents[2] / "observability" / "profiles"
WEIGHT_FORMATS = ("fp8", "bf16", "fp32")


def weight_bytes(config: MiMoConfig, weight_format: str) -> tuple[int, int]:
    """(dense weight bytes, bytes of one expert). "fp8" is the release's format: linear weights in
    FP8 (1 B; the 128x128 block scales, < 0.03%, are left out) except every o_proj (bf16, the
    checkpoint's ignored_layers), bf16 embedding, lm_head and norms, fp32 router gate and bias."""
    counts = param_counts(config)
    dense = counts.total - counts.experts
    if weight_format != "fp8":
        size = {"bf16": 2, "fp32": 4}[weight_format]
        return dense * size, counts.per_expert * size
    h = config.hidden_size
    o_proj = sum(
        config.attention(i).num_q_heads * config.attention(i).v_head_dim * h
        for i in range(config.num_hidden_layers)
    )
    o_proj += config.num_mtp_layers * config.mtp_attention.num_q_heads * config.mtp_attention.v_head_dim * h
    bf16 = counts.embedding + counts.lm_head + counts.norms + config.num_mtp_layers * 5 * h + o_proj
    fp32 = counts.router
    return (dense - bf16 - fp32) + 2 * bf16 + 4 * fp32, counts.per_expert


def model_numbers(config: MiMoConfig, weight_format: str = "fp8", name: str = "model") -> ModelNumbers:
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"--weight-format must be one of {list(WEIGHT_FORMATS)}, got {weight_format!r}")
    counts = param_counts(config)
    num_moe = sum(config.is_moe_layer)
    dense_bytes, expert_bytes = weight_bytes(config, weight_format)
    ga, swa = config.full_attention, config.sliding_attention
    return ModelNumbers(
        name=name,
        hidden_size=config.hidden_size,
        num_full_layers=sum(t is LayerType.FULL for t in config.layer_types),
        num_swa_layers=sum(t is LayerType.SLIDING for t in config.layer_types),
        num_mtp_layers=config.num_mtp_layers,
        kv_values_full=ga.num_kv_heads * (ga.qk_head_dim + ga.v_head_dim),
        kv_values_swa=swa.num_kv_heads * (swa.qk_head_dim + swa.v_head_dim),
        window=config.sliding_window_size,
        num_q_heads=ga.num_q_heads,
        qk_head_dim=ga.qk_head_dim,
        v_head_dim=ga.v_head_dim,
        num_moe_layers=num_moe,
        num_experts=config.num_experts,
        experts_per_token=config.num_experts_per_tok,
        params_per_expert=counts.per_expert,
        dense_params=counts.total - counts.experts,
        active_dense_params=counts.active - num_moe * config.num_experts_per_tok * counts.per_expert,
        dense_weight_bytes=dense_bytes,
        expert_weight_bytes=expert_bytes,
        max_context=config.max_position_embeddings,
    )


def _load(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping")
    return data


def _lengths(value: Any, field: str) -> Lengths:
    if isinstance(value, int):
        return Lengths(((value, 1.0),))
    if isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        return Lengths(tuple((int(n), float(w)) for n, w in value))
    raise ValueError(f"{field}: give a token count or a list of [tokens, weight] pairs, got {value!r}")


def load_traffic(path: Path) -> Traffic:
    d = _load(path)
    try:
        return Traffic(
            qps=float(d["qps"]),
            input_tokens=_lengths(d["input_tokens"], "input_tokens"),
            output_tokens=_lengths(d["output_tokens"], "output_tokens"),
            ttft_slo_s=float(d["ttft_slo_s"]),
            itl_slo_s=float(d["itl_slo_ms"]) / 1000,
            num_mtp_drafts=int(d.get("mtp_drafts", 0)),
            mtp_tokens_per_step=float(d.get("mtp_tokens_per_step", 1.0)),
            prefix_hit_rate=float(d.get("prefix_hit_rate", 0.0)),
            redundant_expert_fraction=float(d.get("redundant_expert_fraction", 0.125)),
        )
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e.args[0]!r}") from None


def load_hardware(path: Path) -> Hardware:
    d = _load(path)
    try:
        return Hardware(
            name=str(d["name"]),
            memory_bytes=int(float(d["memory_gb"]) * GB),
            bandwidth_bytes_s=float(d["bandwidth_tb_s"]) * 1e12,
            flops=float(d["bf16_tflops"]) * 1e12,
            interconnect_bytes_s=float(d["interconnect_gb_s"]) * 1e9,
            memory_utilization=float(d.get("memory_utilization", 0.9)),
            reserve_bytes=int(float(d.get("reserve_gb", 4)) * GB),
            compute_efficiency=float(d.get("compute_efficiency", 0.5)),
            bandwidth_efficiency=float(d.get("bandwidth_efficiency", 0.7)),
            kv_dtype_bytes=int(d.get("kv_dtype_bytes", 2)),
            gpus_per_attention_replica=int(d.get("gpus_per_attention_replica", 1)),
            cost_per_gpu_hour=float(d.get("cost_per_gpu_hour", 1.0)),
        )
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e.args[0]!r}") from None


def plan_json(p: Plan) -> dict[str, Any]:
    d = asdict(p)
    d["reasoning"] = list(p.reasoning)
    return d


def render_text(p: Plan) -> str:
    head = (
        f"attention replicas: {p.attention_replicas}\nexpert shards: {p.expert_shards}\n"
        f"redundant experts per layer: {p.redundant_experts_per_layer}\nGPUs: {p.gpus}"
    )
    return head + "\nreasoning:\n" + "\n".join(f"  - {line}" for line in p.reasoning)


def write_chart(path: Path, m: ModelNumbers, hw: Hardware, t: Traffic) -> list[tuple[float, int | None]]:
    """Cost (GPUs x price per GPU-hour) against load, from 1/4x to 4x the profile's QPS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [t.qps * f / 4 for f in range(1, 17)]
    curve = cost_curve(m, hw, t, loads)
    xs = [q for q, g in curve if g is not None]
    ys = [g * hw.cost_per_gpu_hour for q, g in curve if g is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(xs, ys, where="post", label=f"{m.name} on {hw.name}")
    ax.axvline(t.qps, color="grey", linestyle="--", label=f"profile: {t.qps:g} req/s")
    ax.set_xlabel("load (requests/s)")
    ax.set_ylabel(f"cost per hour ({hw.cost_per_gpu_hour:g} per GPU-hour)")
    ax.set_title("mimo plan: cost against load")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return curve
