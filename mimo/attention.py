"""Hybrid attention of MiMo-V2-Flash: GA or SWA, attention sinks, value scale, q/k != v head dims.

`Attention` owns the projections (`project` -> rotated q, k and scaled v; `output` -> o_proj) so an
engine can keep K/V wherever it likes (paged blocks) and only call `attend` on what it gathers.
`attend` is the reference math: key j is visible to query i iff j <= i and, on SWA layers,
i - j <= window; a sink adds exp(s_h) to the softmax denominator of query head h and carries no value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimo.config import AttentionShape, MiMoConfig
from mimo.layers import apply_rope
from mimo.linear import Linear

# Query rows per chunk are chosen so one chunk's score matrix stays near this many elements.
_MAX_SCORE_ELEMENTS = 1 << 25


class Attention(nn.Module):
    def __init__(self, config: MiMoConfig, shape: AttentionShape) -> None:
        super().__init__()
        h = config.hidden_size
        self.shape = shape
        self.q_proj = nn.Linear(h, shape.num_q_heads * shape.qk_head_dim, bias=False)
        self.k_proj = nn.Linear(h, shape.num_kv_heads * shape.qk_head_dim, bias=False)
        self.v_proj = nn.Linear(h, shape.num_kv_heads * shape.v_head_dim, bias=False)
        self.o_proj = Linear(shape.num_q_heads * shape.v_head_dim, h)
        self.attention_sink_bias = nn.Parameter(torch.zeros(shape.num_q_heads)) if shape.has_sink else None
        self.scale = shape.qk_head_dim**-0.5
        self.value_scale = config.attention_value_scale

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., T, hidden] -> q [..., T, Hq, Dqk], k [..., T, Hkv, Dqk], v [..., T, Hkv, Dv]."""
        s = self.shape
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, s.num_q_heads, s.qk_head_dim)
        k = self.k_proj(x).view(*lead, s.num_kv_heads, s.qk_head_dim)
        v = self.v_proj(x).view(*lead, s.num_kv_heads, s.v_head_dim) * self.value_scale
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """attn [..., T, Hq, Dv] -> [..., T, hidden]."""
        return self.o_proj(attn.flatten(-2))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
    ) -> torch.Tensor:
        return attend(
            q, k, v, q_pos, k_pos, scale=self.scale, window=self.shape.window, sinks=self.attention_sink_bias
        )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """q [B, T, Hq, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv]; q_pos [T], k_pos [S] ascending.

    Returns [B, T, Hq, Dv]. Long query sets are processed in chunks, and on SWA layers each chunk
    only looks at keys inside its window, so memory stays bounded on long prompts.
    """
    num_q, num_k, num_q_heads = q.shape[1], k.shape[1], q.shape[2]
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, num_k * num_q_heads * q.shape[0]))
    if window is not None:
        # blockwise local attention: a chunk of `window` queries needs only 2 * window keys
        rows = max(window, 32)
    if num_q <= rows:
        return _attend_chunk(q, k, v, q_pos, k_pos, scale, window, sinks)
    outs = []
    for start in range(0, num_q, rows):
        qp = q_pos[start : start + rows]
        lo = 0
        if window is not None:
            lo = int(torch.searchsorted(k_pos, qp.min() - window))
        hi = int(torch.searchsorted(k_pos, qp.max(), right=True))
        outs.append(
            _attend_chunk(
                q[:, start : start + rows], k[:, lo:hi], v[:, lo:hi], qp, k_pos[lo:hi], scale, window, sinks
            )
        )
    return torch.cat(outs, dim=1)


def _attend_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    b, t, hq, _ = q.shape
    delta = q_pos[:, None] - k_pos[None, :]  # [T, S]
    visible = delta >= 0
    if window is not None:
        visible = visible & (delta <= window)
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill(
        ~visible, float("-inf")
    )
    if sinks is not None:
        # The sink is one extra key whose score is s_h for every query and whose value is zero:
        # a zero key plus an additive mask column of s_h gives exactly exp(s_h) in the denominator.
        k = torch.cat((k, k.new_zeros(b, 1, *k.shape[2:])), dim=1)
        v = torch.cat((v, v.new_zeros(b, 1, *v.shape[2:])), dim=1)
        sink_col = sinks.float().view(hq, 1, 1).expand(hq, t, 1)
        mask = torch.cat((mask.expand(hq, *mask.shape), sink_col), dim=-1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask.to(q.dtype),
        scale=scale,
        enable_gqa=True,
    )  # [B, Hq, T, Dv]
    return out.transpose(1, 2)
