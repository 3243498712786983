"""Attention over paged KV blocks, in torch, for a flat batch of sequence segments.

A step feeds each sequence a segment of tokens (a prefill chunk, one decode token, or a token plus
MTP drafts) at known positions. `AttentionBatch` is built once per step and per pool (GA or SWA):
where each new token's K/V goes (flat slot = block * block_size + offset) and, per group of
segments with the same query count, which slots to gather and the visibility mask (causal, and on
SWA the window). Every layer of that type reuses it: write K/V, gather, one SDPA call per group.
Sinks enter as one extra zero key whose mask column holds s_h (exactly exp(s_h) in the denominator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens in this step: rows [row_start, row_start + num_tokens) of the flat batch."""

    row_start: int
    num_tokens: int
    start_position: int
    block_table: Sequence[int | None]  # this pool's table; None = released (outside the window)


@dataclass(frozen=True)
class Group:
    """Segments with the same query count, attended in one SDPA call."""

    rows: torch.Tensor  # [B, Q] flat row index of each query
    key_slots: torch.Tensor  # [B, S] flat slot of each gathered key (padding -> slot 0, masked)
    mask: torch.Tensor  # [B, 1, Q, S] additive: 0 visible, -inf hidden


@dataclass(frozen=True)
class AttentionBatch:
    write_slots: torch.Tensor  # [N] flat slot of every new token, in row order
    groups: list[Group]


class PagedKV:
    """K/V storage of one pool: per layer a flat [num_blocks * block_size, heads, dim] tensor."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        qk_head_dim: int,
        v_head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        slots = num_blocks * block_size
        self.block_size = block_size
        self.k = [
            torch.zeros(slots, num_kv_heads, qk_head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.v = [
            torch.zeros(slots, num_kv_heads, v_head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def _slot(table: Sequence[int | None], position: int, block_size: int) -> int:
    block = table[position // block_size]
    assert block is not None, f"position {position} lies in a released block"
    return block * block_size + position % block_size


def build_batch(
    segments: Sequence[Segment], block_size: int, window: int | None, device: torch.device
) -> AttentionBatch:
    """Slots and masks for one pool. window=None: global attention (every earlier key)."""
    write: list[int] = []
    for seg in segments:
        for p in range(seg.start_position, seg.start_position + seg.num_tokens):
            write.append(_slot(seg.block_table, p, block_size))
    by_q: dict[int, list[Segment]] = {}
    for seg in segments:
        by_q.setdefault(seg.num_tokens, []).append(seg)
    groups = [_group(segs, q, block_size, window, device) for q, segs in by_q.items()]
    return AttentionBatch(torch.tensor(write, dtype=torch.long, device=device), groups)


def _group(
    segs: list[Segment], num_q: int, block_size: int, window: int | None, device: torch.device
) -> Group:
    key_ranges = []
    for seg in segs:
        end = seg.start_position + seg.num_tokens
        first = 0 if window is None else max(0, seg.start_position - window)
        key_ranges.append((first, end))
    num_keys = max(end - first for first, end in key_ranges)
    rows = torch.empty(len(segs), num_q, dtype=torch.long)
    slots = torch.zeros(len(segs), num_keys, dtype=torch.long)
    visible = torch.zeros(len(segs), num_q, num_keys, dtype=torch.bool)
    for b, (seg, (first, end)) in enumerate(zip(segs, key_ranges, strict=True)):
        rows[b] = torch.arange(seg.row_start, seg.row_start + num_q)
        n = end - first
        slots[b, :n] = torch.tensor([_slot(seg.block_table, p, block_size) for p in range(first, end)])
        q_pos = torch.arange(seg.start_position, end)[:, None]
        k_pos = torch.arange(first, end)[None, :]
        delta = q_pos - k_pos
        ok = delta >= 0
        if window is not None:
            ok &= delta <= window
        visible[b, :, :n] = ok
    mask = torch.zeros(visible.shape, dtype=torch.float32).masked_fill(~visible, float("-inf"))
    return Group(rows.to(device), slots.to(device), mask.unsqueeze(1).to(device))


def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """q [N, Hq, Dqk], k_new/v_new [N, Hkv, D*]: writes the new K/V, then attends. -> [N, Hq, Dv]."""
    cache_k[batch.write_slots] = k_new.to(cache_k.dtype)
    cache_v[batch.write_slots] = v_new.to(cache_v.dtype)
    num_q_heads = q.shape[1]
    out = q.new_empty(q.shape[0], num_q_heads, cache_v.shape[-1])
    for g in batch.groups:
        qg = q[g.rows].transpose(1, 2)  # [B, Hq, Q, Dqk]
        kg = cache_k[g.key_slots].transpose(1, 2)  # [B, Hkv, S, Dqk]
        vg = cache_v[g.key_slots].transpose(1, 2)  # [B, Hkv, S, Dv]
        mask = g.mask
        if sinks is not None:
            b, _, num_q, _ = mask.shape
            kg = torch.cat((kg, kg.new_zeros(b, kg.shape[1], 1, kg.shape[-1])), dim=2)
            vg = torch.cat((vg, vg.new_zeros(b, vg.shape[1], 1, vg.shape[-1])), dim=2)
            sink_col = sinks.float().view(1, num_q_heads, 1, 1).expand(b, num_q_heads, num_q, 1)
            mask = torch.cat((mask.expand(b, num_q_heads, num_q, mask.shape[-1]), sink_col), dim=-1)
        o = F.scaled_dot_product_attention(
            qg, kg.to(q.dtype), vg.to(q.dtype), attn_mask=mask.to(q.dtype), scale=scale, enable_gqa=True
        )  # [B, Hq, Q, Dv]
        out[g.rows] = o.transpose(1, 2)
    return out
