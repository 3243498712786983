"""MiMo-V2-Flash configuration: a hub `config.json` parsed into one frozen, validated object.

Reads the release's own field names (`hybrid_layer_pattern`, `swa_*`, `add_*_sink_bias`,
`moe_layer_freq`, `sliding_window_size`, rope thetas, `partial_rotary_factor`,
`quantization_config`) and checks them against the names transformers uses where a file carries
both. Every error names the field at fault. Derived facts (layer types, rotary dim, KV bytes,
parameter counts) live in `mimo/sizes.py`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

MODEL_TYPE = "mimo_v2_flash"
DEFAULT_NUM_MTP_LAYERS = 3  # the release ships 3 MTP blocks; its config.json carries no count key


class ConfigError(ValueError):
    """A config.json field is missing, of the wrong type, or inconsistent with another field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"config field '{field}': {message}")
        self.field = field


class LayerType(StrEnum):
    FULL = "full_attention"
    SLIDING = "sliding_attention"


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of one attention flavour (GA or SWA); `window` is None for global attention."""

    num_q_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    rope_theta: float
    window: int | None  # keys visible besides the query itself: 0 <= i - j <= window
    has_sink: bool

    @property
    def num_q_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class QuantizationConfig:
    quant_method: str
    fmt: str
    weight_block_size: tuple[int, int]
    ignored_layers: frozenset[str]


@dataclass(frozen=True)
class MiMoConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    moe_intermediate_size: int
    full_attention: AttentionShape
    sliding_attention: AttentionShape
    layer_types: tuple[LayerType, ...]
    is_moe_layer: tuple[bool, ...]
    partial_rotary_factor: float
    sliding_window_size: int
    attention_value_scale: float
    rms_norm_eps: float
    num_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    num_mtp_layers: int
    max_position_embeddings: int
    torch_dtype: str
    quantization: QuantizationConfig | None
    eos_token_id: tuple[int, ...]

    def attention(self, layer_idx: int) -> AttentionShape:
        if self.layer_types[layer_idx] is LayerType.FULL:
            return self.full_attention
        return self.sliding_attention

    @property
    def mtp_attention(self) -> AttentionShape:
        """MTP blocks use SWA attention (heads, sink, theta) whatever the main layers do."""
        return self.sliding_attention

    @property
    def rotary_dim(self) -> int:
        return int(self.full_attention.qk_head_dim * self.partial_rotary_factor)

    @staticmethod
    def from_file(path: str | Path) -> MiMoConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError("<file>", f"{p} is not valid JSON: {e}") from None
        return MiMoConfig.from_hub_dict(raw)

    @staticmethod
    def from_hub_dict(raw: Mapping[str, Any]) -> MiMoConfig:
        return _parse(_Fields(raw))

    def attention_for_type(self, layer_type: LayerType) -> AttentionShape:
        return self.full_attention if layer_type is LayerType.FULL else self.sliding_attention


class _Fields:
    """Typed access to raw config fields; every failure names the field."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def int_(self, name: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.raw.get(name, default)
        if value is None:
            raise ConfigError(name, "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(name, f"must be >= {minimum}, got {value}")
        return value

    def float_(self, name: str, default: float | None = None) -> float:
        value = self.raw.get(name, default)
        if value is None:
            value = default
        if value is None:
            raise ConfigError(name, "is required")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, f"must be a number, got {value!r}")
        return float(value)

    def bool_(self, name: str, default: bool) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value

    def str_(self, name: str, default: str | None = None) -> str:
        value = self.raw.get(name, default)
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return value

    def int_list(self, name: str, length: int, allowed: Sequence[int]) -> list[int] | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != length:
            raise ConfigError(name, f"must be a list of {length} entries (num_hidden_layers)")
        if any(isinstance(v, bool) or v not in allowed for v in value):
            raise ConfigError(name, f"entries must be in {list(allowed)}, got {value}")
        return list(value)

    def str_list(self, name: str, length: int, allowed: Sequence[str]) -> list[str] | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != length:
            raise ConfigError(name, f"must be a list of {length} entries (num_hidden_layers)")
        if any(v not in allowed for v in value):
            raise ConfigError(name, f"entries must be in {list(allowed)}, got {value}")
        return list(value)


def _parse(f: _Fields) -> MiMoConfig:
    model_type = f.raw.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConfigError("model_type", f"expected '{MODEL_TYPE}', got {model_type!r}")
    num_layers = f.int_("num_hidden_layers")
    layer_types = _layer_types(f, num_layers)
    is_moe = _moe_layers(f, num_layers)
    window = _sliding_window(f)
    partial = f.float_("partial_rotary_factor", 1.0)
    if not 0.0 < partial <= 1.0:
        raise ConfigError("partial_rotary_factor", f"must be in (0, 1], got {partial}")

    full = AttentionShape(
        num_q_heads=f.int_("num_attention_heads"),
        num_kv_heads=f.int_("num_key_value_heads"),
        qk_head_dim=f.int_("head_dim"),
        v_head_dim=f.int_("v_head_dim", f.raw.get("head_dim")),
        rope_theta=_rope_theta(f, LayerType.FULL, "rope_theta", 10000.0),
        window=None,
        has_sink=f.bool_("add_full_attention_sink_bias", False),
    )
    swa = AttentionShape(
        num_q_heads=f.int_("swa_num_attention_heads", full.num_q_heads),
        num_kv_heads=f.int_("swa_num_key_value_heads", full.num_kv_heads),
        qk_head_dim=f.int_("swa_head_dim", full.qk_head_dim),
        v_head_dim=f.int_("swa_v_head_dim", full.v_head_dim),
        rope_theta=_rope_theta(f, LayerType.SLIDING, "swa_rope_theta", full.rope_theta),
        window=window,
        has_sink=f.bool_("add_swa_attention_sink_bias", False),
    )
    for prefix, shape in (("", full), ("swa_", swa)):
        if shape.num_q_heads % shape.num_kv_heads:
            raise ConfigError(
                f"{prefix}num_key_value_heads",
                f"{shape.num_kv_heads} does not divide {prefix}num_attention_heads {shape.num_q_heads}",
            )
        rotary = int(shape.qk_head_dim * partial)
        if rotary % 2 or rotary == 0:
            raise ConfigError(
                "partial_rotary_factor",
                f"int({prefix}head_dim {shape.qk_head_dim} * {partial}) = {rotary} must be even and > 0",
            )
    if int(swa.qk_head_dim * partial) != int(full.qk_head_dim * partial):
        raise ConfigError("swa_head_dim", "GA and SWA layers must share the rotary dim")

    hidden = f.int_("hidden_size")
    num_experts = f.int_("n_routed_experts", 1)
    top_k = f.int_("num_experts_per_tok", 1)
    if top_k > num_experts:
        raise ConfigError("num_experts_per_tok", f"{top_k} exceeds n_routed_experts {num_experts}")
    n_group = f.int_("n_group", 1)
    topk_group = f.int_("topk_group", 1)
    if num_experts % n_group or topk_group > n_group:
        raise ConfigError("n_group", f"n_group {n_group} / topk_group {topk_group} invalid for {num_experts}")
    if n_group != 1:
        raise ConfigError("n_group", "only n_group == 1 (plain top-k) is implemented, as in the release")
    if f.has("n_shared_experts") and f.raw["n_shared_experts"] != 0:
        raise ConfigError("n_shared_experts", "shared experts are not part of MiMo-V2-Flash")
    if f.str_("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError("scoring_func", f"only 'sigmoid' is supported, got {f.raw['scoring_func']!r}")
    if f.str_("topk_method", "noaux_tc") != "noaux_tc":
        raise ConfigError("topk_method", f"only 'noaux_tc' is supported, got {f.raw['topk_method']!r}")
    if f.str_("hidden_act", "silu") != "silu":
        raise ConfigError("hidden_act", f"only 'silu' is supported, got {f.raw['hidden_act']!r}")
    if f.raw.get("attention_bias", False):
        raise ConfigError("attention_bias", "MiMo-V2-Flash has no attention biases")
    if f.bool_("tie_word_embeddings", False):
        raise ConfigError("tie_word_embeddings", "MiMo-V2-Flash has an untied lm_head")
    if f.raw.get("rope_scaling") not in (None, {}):
        raise ConfigError("rope_scaling", "rope scaling is not part of MiMo-V2-Flash")
    eps = _norm_eps(f)
    eos = f.raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    return MiMoConfig(
        vocab_size=f.int_("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        intermediate_size=f.int_("intermediate_size"),
        moe_intermediate_size=f.int_("moe_intermediate_size"),
        full_attention=full,
        sliding_attention=swa,
        layer_types=layer_types,
        is_moe_layer=is_moe,
        partial_rotary_factor=partial,
        sliding_window_size=window,
        attention_value_scale=f.float_("attention_value_scale", 1.0),
        rms_norm_eps=eps,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=f.bool_("norm_topk_prob", True),
        routed_scaling_factor=f.float_("routed_scaling_factor", 1.0),
        num_mtp_layers=f.int_("num_nextn_predict_layers", DEFAULT_NUM_MTP_LAYERS, minimum=0),
        max_position_embeddings=f.int_("max_position_embeddings"),
        torch_dtype=f.str_("torch_dtype", "bfloat16"),
        quantization=_quantization(f),
        eos_token_id=eos_ids,
    )


def _layer_types(f: _Fields, num_layers: int) -> tuple[LayerType, ...]:
    pattern = f.int_list("hybrid_layer_pattern", num_layers, (0, 1))
    names = f.str_list("layer_types", num_layers, [t.value for t in LayerType])
    from_names = [LayerType(n) for n in names] if names is not None else None
    if pattern is not None:
        from_pattern = [LayerType.FULL if p == 0 else LayerType.SLIDING for p in pattern]
        if from_names is not None and from_names != from_pattern:
            raise ConfigError("layer_types", "disagrees with hybrid_layer_pattern")
        return tuple(from_pattern)
    if from_names is not None:
        return tuple(from_names)
    raise ConfigError("hybrid_layer_pattern", "is required (or transformers' layer_types)")


def _moe_layers(f: _Fields, num_layers: int) -> tuple[bool, ...]:
    freq = f.int_list("moe_layer_freq", num_layers, (0, 1))
    names = f.str_list("mlp_layer_types", num_layers, ["dense", "sparse"])
    from_names = [n == "sparse" for n in names] if names is not None else None
    if freq is not None:
        from_freq = [bool(x) for x in freq]
        if from_names is not None and from_names != from_freq:
            raise ConfigError("mlp_layer_types", "disagrees with moe_layer_freq")
        return tuple(from_freq)
    if from_names is not None:
        return tuple(from_names)
    raise ConfigError("moe_layer_freq", "is required (a 0/1 list per layer, or mlp_layer_types)")


def _sliding_window(f: _Fields) -> int:
    size = f.int_("sliding_window_size", f.raw.get("sliding_window"))
    other = f.raw.get("sliding_window")
    # transformers stores the window counting the query (size + 1); the hub stores both as size.
    if other is not None and other not in (size, size + 1):
        raise ConfigError("sliding_window", f"{other} disagrees with sliding_window_size {size}")
    return size


def _rope_theta(f: _Fields, layer_type: LayerType, hub_name: str, default: float) -> float:
    theta = f.float_(hub_name, default)
    params = f.raw.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get(layer_type.value), Mapping):
        other = params[layer_type.value].get("rope_theta")
        if other is not None and float(other) != theta and f.has(hub_name):
            raise ConfigError(f"rope_parameters.{layer_type.value}.rope_theta", f"disagrees with {hub_name}")
        if other is not None and not f.has(hub_name):
            theta = float(other)
    if theta <= 0:
        raise ConfigError(hub_name, f"must be > 0, got {theta}")
    return theta


def _norm_eps(f: _Fields) -> float:
    eps = f.float_("layernorm_epsilon", f.raw.get("rms_norm_eps", 1e-5))
    if f.has("rms_norm_eps") and f.has("layernorm_epsilon") and f.raw["rms_norm_eps"] != eps:
        raise ConfigError("rms_norm_eps", "disagrees with layernorm_epsilon")
    return eps


def _quantization(f: _Fields) -> QuantizationConfig | None:
    raw = f.raw.get("quantization_config")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("quantization_config", "must be an object")
    if raw.get("quant_method") != "fp8":
        raise ConfigError(
            "quantization_config.quant_method", f"only 'fp8' is supported, got {raw.get('quant_method')!r}"
        )
    if raw.get("fmt", "e4m3") != "e4m3":
        raise ConfigError("quantization_config.fmt", f"only 'e4m3' is supported, got {raw.get('fmt')!r}")
    block = raw.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(
            "quantization_config.weight_block_size", f"must be two positive ints, got {block!r}"
        )
    ignored = raw.get("ignored_layers", [])
    if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
        raise ConfigError("quantization_config.ignored_layers", "must be a list of module names")
    return QuantizationConfig("fp8", "e4m3", (block[0], block[1]), frozenset(ignored))
