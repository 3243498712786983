"""MiMo-V2-Flash in plain PyTorch: decoder layers, the MTP blocks and the causal-LM head.

Module and parameter names equal the hub checkpoint's (`model.layers.N.self_attn.q_proj.weight`,
`model.mtp.layers.J.eh_proj.weight`, ...) except that each layer's experts are stacked
(see `mimo/weights.py`). Each decoder layer exposes its attention half (`attention_half`) and its
MLP/MoE half (`mlp`) separately, so expert shards can run only the latter. Tensors are batched as
[B, T, H] with one position vector [T] shared by the batch; the engine builds its own paged path
from the same modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mimo.attention import Attention
from mimo.config import LayerType, MiMoConfig
from mimo.layers import DenseMLP, RMSNorm, RotaryEmbedding
from mimo.linear import Linear
from mimo.moe import MoE, Router

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LayerKV:
    """Contiguous K/V of one attention layer for a batch of equally long sequences (plain path)."""

    k: torch.Tensor | None = None  # [B, S, Hkv, Dqk]
    v: torch.Tensor | None = None  # [B, S, Hkv, Dv]
    positions: torch.Tensor | None = None  # [S]

    def append(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.k is None or self.v is None or self.positions is None:
            self.k, self.v, self.positions = k, v, positions
        else:
            self.k = torch.cat((self.k, k), dim=1)
            self.v = torch.cat((self.v, v), dim=1)
            self.positions = torch.cat((self.positions, positions))
        return self.k, self.v, self.positions


@dataclass
class KVCache:
    """Per-layer caches of the main layers and of the MTP blocks for one batch of sequences."""

    layers: list[LayerKV]
    mtp: list[LayerKV] = field(default_factory=list)

    @staticmethod
    def empty(config: MiMoConfig) -> KVCache:
        return KVCache(
            [LayerKV() for _ in range(config.num_hidden_layers)],
            [LayerKV() for _ in range(config.num_mtp_layers)],
        )

    @property
    def num_tokens(self) -> int:
        p = self.layers[0].positions
        return 0 if p is None else int(p.numel())


def _attend_with_cache(
    attn: Attention, x: torch.Tensor, rope: Rope, positions: torch.Tensor, kv: LayerKV | None
) -> torch.Tensor:
    q, k, v = attn.project(x, *rope)
    k_pos = positions
    if kv is not None:
        k, v, k_pos = kv.append(k, v, positions)
    return attn.output(attn.attend(q, k, v, positions, k_pos))


class DecoderLayer(nn.Module):
    def __init__(self, config: MiMoConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, config.attention(layer_idx))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MoE | DenseMLP = (
            MoE(config)
            if config.is_moe_layer[layer_idx]
            else DenseMLP(config.hidden_size, config.intermediate_size)
        )

    def attention_half(
        self, h: torch.Tensor, rope: Rope, positions: torch.Tensor, kv: LayerKV | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (residual stream after attention, normed input of the MLP/MoE half)."""
        h = h + _attend_with_cache(self.self_attn, self.input_layernorm(h), rope, positions, kv)
        return h, self.post_attention_layernorm(h)

    def forward(
        self, h: torch.Tensor, rope: Rope, positions: torch.Tensor, kv: LayerKV | None
    ) -> torch.Tensor:
        h, x = self.attention_half(h, rope, positions, kv)
        return h + self.mlp(x)


class MTPBlock(nn.Module):
    """One multi-token-prediction block: h' = eh_proj([enorm(embed(next token)), hnorm(h_prev)]),
    then a pre-norm SWA attention + dense SwiGLU block; logits via final_layernorm and lm_head."""

    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(h, eps)
        self.hnorm = RMSNorm(h, eps)
        self.eh_proj = Linear(2 * h, h)
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention(config, config.mtp_attention)
        self.pre_mlp_layernorm = RMSNorm(h, eps)
        self.mlp = DenseMLP(h, config.intermediate_size)
        self.final_layernorm = RMSNorm(h, eps)

    def forward(
        self, emb: torch.Tensor, h_prev: torch.Tensor, rope: Rope, positions: torch.Tensor, kv: LayerKV | None
    ) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))
        x = x + _attend_with_cache(self.self_attn, self.input_layernorm(x), rope, positions, kv)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class MTPStack(nn.Module):
    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MTPBlock(config) for _ in range(config.num_mtp_layers)])


class MiMoModel(nn.Module):
    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mtp = MTPStack(config)
        self.rope = nn.ModuleDict(
            {
                t.value: RotaryEmbedding(config.rotary_dim, config.attention_for_type(t).rope_theta)
                for t in LayerType
            }
        )


class MiMoForCausalLM(nn.Module):
    def __init__(self, config: MiMoConfig, source: Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.source = source  # the checkpoint directory it was loaded from (None: built in memory)
        self.model = MiMoModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def rope(self, layer_type: LayerType, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        rotary = self.model.rope[layer_type.value]
        assert isinstance(rotary, RotaryEmbedding)
        return rotary(positions, dtype)

    def forward_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """input_ids [B, T], positions [T] -> last hidden state [B, T, H] before the final norm."""
        h = self.model.embed_tokens(input_ids)
        ropes = {t: self.rope(t, positions, h.dtype) for t in set(self.config.layer_types)}
        for i, layer in enumerate(self.model.layers):
            assert isinstance(layer, DecoderLayer)
            kv = cache.layers[i] if cache is not None else None
            h = layer(h, ropes[layer.layer_type], positions, kv)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))

    def mtp_hidden(
        self,
        block: int,
        next_ids: torch.Tensor,
        h_prev: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """MTP block `block` at slots `positions`: next_ids [B, T] are the tokens one step ahead of
        h_prev's slot (the main model's or the previous block's); returns the block's hidden state."""
        mtp = self.model.mtp.layers[block]
        assert isinstance(mtp, MTPBlock)
        emb = self.model.embed_tokens(next_ids)
        rope = self.rope(LayerType.SLIDING, positions, emb.dtype)
        kv = cache.mtp[block] if cache is not None else None
        return mtp(emb, h_prev, rope, positions, kv)

    def mtp_logits(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        mtp = self.model.mtp.layers[block]
        assert isinstance(mtp, MTPBlock)
        return self.lm_head(mtp.final_layernorm(hidden))


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts weights to `dtype` but keeps every router in fp32, as the checkpoint stores it."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, Router):
            module.float()
    return model
