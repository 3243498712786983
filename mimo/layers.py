"""Small building blocks of MiMo-V2-Flash: RMSNorm, partial rotary embedding, dense SwiGLU.

Numerics follow the reference exactly (fp32 variance in RMSNorm, weight applied after the cast
back; rotate-half RoPE on the first `rotary_dim` q/k dims only) so fp32 logits agree with
transformers' `MiMoV2FlashForCausalLM` to ~1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimo.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op, same math
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # fp32 variance
        return self.weight * normed.to(x.dtype)  # weight after the cast back, as the reference


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; rotates only the first `rotary_dim` dims (NeoX halves)."""

    def __init__(self, rotary_dim: int, theta: float) -> None:
        super().__init__()
        # Built on the CPU explicitly: a model constructed on the meta device still gets real tables.
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim
        inv_freq = 1.0 / (theta**exponents)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rotary_dim = rotary_dim

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [..., T] -> cos, sin [..., T, rotary_dim]
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, head_dim]; cos/sin [..., T, rotary_dim] broadcast over heads."""
    rd = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class DenseMLP(nn.Module):
    """SwiGLU MLP of layer 0 and of every MTP block."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
