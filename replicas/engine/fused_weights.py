"""Weights of the paged forward, rearranged once at load so a decode step runs few torch ops.

The step is bound by per-op overhead, not FLOPs, so each attention layer's q, k, v projections, the
softmax scale, the value scale and the rotate-half partners of the rotary dims become one matrix
(one matmul, then RoPE as two in-place ops per q and k), and a dense SwiGLU's gate and up one
matrix. These are derived copies of the `mimo` modules' weights: change those in place after
building a `PagedModel` and rebuild it. `RopeTable` keeps the cos/sin rows of every position seen,
computed exactly as `mimo.layers.RotaryEmbedding` does, so a step only indexes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimo.attention import Attention
from mimo.layers import DenseMLP, RotaryEmbedding
from mimo.linear import PackedWeight, linear, maybe_packed


@dataclass(frozen=True)
class FusedAttention:
    """weight [Hq*Dqk + Hkv*(Dqk+Dv) + (Hq+Hkv)*rd, H] rows: q (times the softmax scale), per KV head
    its k then v (times the value scale), then per q head and per k head the rotate-half partners
    of its first rd dims; sink [Hkv, 1, G, 1, 1] fp32 or None; packed: its oneDNN pack on the CPU.
    o_proj stays the module's own (under tensor parallelism a row-parallel linear that all-reduces)."""

    weight: torch.Tensor
    sink: torch.Tensor | None
    packed: PackedWeight | None
    num_q_heads: int
    num_kv_heads: int
    qk_dim: int
    v_dim: int
    rotary_dim: int

    @staticmethod
    def build(attn: Attention, rotary_dim: int) -> FusedAttention:
        s = attn.shape
        hq, hkv, dqk, dv = s.num_q_heads, s.num_kv_heads, s.qk_head_dim, s.v_head_dim
        with torch.no_grad():
            wq = attn.q_proj.weight.detach().view(hq, dqk, -1) * attn.scale
            wk = attn.k_proj.weight.detach().view(hkv, dqk, -1)
            wv = attn.v_proj.weight.detach().view(hkv, dv, -1) * attn.value_scale
            half = rotary_dim // 2

            def partners(w: torch.Tensor) -> torch.Tensor:  # [heads, D, H] -> [heads * rd, H]
                rot = w[:, :rotary_dim]
                return torch.cat((-rot[:, half:], rot[:, :half]), dim=1).reshape(-1, w.shape[-1])

            weight = torch.cat(
                (wq.reshape(-1, wq.shape[-1]), torch.cat((wk, wv), dim=1).reshape(-1, wk.shape[-1]),
                 partners(wq), partners(wk))
            ).contiguous()  # fmt: skip
            sink = None
            if attn.attention_sink_bias is not None:
                sink = attn.attention_sink_bias.detach().float().view(hkv, 1, hq // hkv, 1, 1).clone()
        return FusedAttention(weight, sink, maybe_packed(weight), hq, hkv, dqk, dv, rotary_dim)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], cos/sin [N, 1, rd] -> rotated scaled q [N, Hq, Dqk], rotated k|v [N, Hkv, Dqk+Dv]."""
        n, hq, hkv, dqk, rd = x.shape[0], self.num_q_heads, self.num_kv_heads, self.qk_dim, self.rotary_dim
        y = linear(x, self.weight, self.packed)
        q_end = hq * dqk
        kv_end = q_end + hkv * (dqk + self.v_dim)
        q = y[:, :q_end].view(n, hq, dqk)
        kv = y[:, q_end:kv_end].view(n, hkv, dqk + self.v_dim)
        q[..., :rd].mul_(cos).addcmul_(y[:, kv_end : kv_end + hq * rd].view(n, hq, rd), sin)
        kv[..., :rd].mul_(cos).addcmul_(y[:, kv_end + hq * rd :].view(n, hkv, rd), sin)
        return q, kv


@dataclass(frozen=True)
class FusedMLP:
    """A dense SwiGLU with gate and up in one matrix [2I, H] (packed on the CPU); down_proj stays
    the module's own."""

    gate_up: torch.Tensor
    packed: PackedWeight | None
    down: nn.Module

    @staticmethod
    def build(mlp: DenseMLP) -> FusedMLP:
        with torch.no_grad():
            gate_up = torch.cat((mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach())).contiguous()
        return FusedMLP(gate_up, maybe_packed(gate_up), mlp.down_proj)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up, self.packed).chunk(2, dim=-1)
        out: torch.Tensor = self.down(F.silu(gate) * up)
        return out


class RopeTable:
    """cos and sin rows [P, 2, 1, rd] of positions [0, P), grown by doubling as positions appear."""

    def __init__(self, rotary: RotaryEmbedding, dtype: torch.dtype, device: torch.device) -> None:
        self.rotary = rotary
        self.dtype = dtype
        self.device = device
        self.table = torch.empty(0, 2, 1, rotary.rotary_dim, dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] (all < max_position + 1) -> cos, sin [N, 1, rd]."""
        if max_position >= self.table.shape[0]:
            size = max(64, 2 * self.table.shape[0], max_position + 1)
            cos, sin = self.rotary(torch.arange(size, device=self.device), self.dtype)  # [P, rd]
            self.table = torch.stack((cos, sin), dim=1).unsqueeze(2)
        rows = self.table.index_select(0, positions)  # [N, 2, 1, rd]
        return rows[:, 0], rows[:, 1]
