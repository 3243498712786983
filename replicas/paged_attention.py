"""Attention over paged KV blocks, in torch, for a flat batch of sequence segments.

A step feeds each sequence a segment of tokens (a prefill chunk, one decode token, or a token plus
MTP drafts) at known positions. `AttentionBatch` is built once per step and per pool (GA or SWA):
where each new token's K/V goes (flat slot = block * block_size + offset) and, per group of
segments with the same query count, which slots to gather and the visibility mask (causal, and on
SWA the window). Every layer of that type reuses it: write K/V, gather, one attention per group.
Sinks add exp(s_h) to each query head's softmax denominator and carry no value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens in this step: rows [row_start, row_start + num_tokens) of the flat batch."""

    row_start: int
    num_tokens: int
    start_position: int
    block_table: Sequence[int | None]  # this pool's table; None = released (outside the window)


@dataclass(frozen=True)
class Group:
    """Segments with the same query count, attended together."""

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


def _tables(segs: Sequence[Segment]) -> torch.Tensor:
    """Block tables padded into [num_segs, max_blocks]; released (None) entries read as block 0,
    which is never gathered unmasked nor written (only visible, live positions are)."""
    width = max(1, max(len(seg.block_table) for seg in segs))
    rows = [
        [b if b is not None else 0 for b in seg.block_table] + [0] * (width - len(seg.block_table))
        for seg in segs
    ]
    return torch.tensor(rows, dtype=torch.long)


def build_batch(
    segments: Sequence[Segment], block_size: int, window: int | None, device: torch.device
) -> AttentionBatch:
    """Slots and masks for one pool. window=None: global attention (every earlier key)."""
    tables = _tables(segments)
    lengths = torch.tensor([seg.num_tokens for seg in segments])
    starts = torch.tensor([seg.start_position for seg in segments])
    seg_of_row = torch.repeat_interleave(torch.arange(len(segments)), lengths)  # [N]
    first_row = torch.cumsum(lengths, 0) - lengths
    positions = starts[seg_of_row] + torch.arange(int(lengths.sum())) - first_row[seg_of_row]
    write = tables[seg_of_row, positions // block_size] * block_size + positions % block_size
    by_q: dict[int, list[int]] = {}
    for i, seg in enumerate(segments):
        by_q.setdefault(seg.num_tokens, []).append(i)
    groups = [
        _group(tables[idx], starts[idx], first_row[idx], q, block_size, window, device)
        for q, idx in ((q, torch.tensor(ids)) for q, ids in by_q.items())
    ]
    return AttentionBatch(write.to(device), groups)


def _group(
    tables: torch.Tensor,
    starts: torch.Tensor,
    first_rows: torch.Tensor,
    num_q: int,
    block_size: int,
    window: int | None,
    device: torch.device,
) -> Group:
    """tables [B, blocks], starts/first_rows [B]: one attention call's gather indices and mask."""
    ends = starts + num_q  # exclusive
    firsts = torch.zeros_like(starts) if window is None else (starts - window).clamp(min=0)
    num_keys = int((ends - firsts).max())
    k_pos = firsts[:, None] + torch.arange(num_keys)[None, :]  # [B, S]
    in_range = k_pos < ends[:, None]
    k_pos = torch.where(in_range, k_pos, firsts[:, None])  # padding reads a live key, then is masked
    slots = tables.gather(1, k_pos // block_size) * block_size + k_pos % block_size
    q_pos = starts[:, None] + torch.arange(num_q)[None, :]  # [B, Q]
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, Q, S]
    visible = (delta >= 0) & in_range[:, None, :]
    if window is not None:
        visible &= delta <= window
    mask = torch.zeros(visible.shape, dtype=torch.float32).masked_fill(~visible, float("-inf"))
    rows = first_rows[:, None] + torch.arange(num_q)[None, :]
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
    """q [N, Hq, Dqk], k_new/v_new [N, Hkv, D*]: writes the new K/V, then attends. -> [N, Hq, Dv].

    Written out with matmuls rather than SDPA: q/k and v head dims differ, which sends SDPA to its
    slow math path, and GQA here needs only a view (query heads of one KV head side by side).
    """
    cache_k[batch.write_slots] = k_new.to(cache_k.dtype)
    cache_v[batch.write_slots] = v_new.to(cache_v.dtype)
    num_q_heads, num_kv_heads = q.shape[1], cache_k.shape[1]
    group = num_q_heads // num_kv_heads
    out = q.new_empty(q.shape[0], num_q_heads, cache_v.shape[-1])
    sink = None if sinks is None else sinks.float().view(1, num_kv_heads, group, 1, 1)  # [1, Hkv, G, 1, 1]
    for g in batch.groups:
        b, num_q = g.rows.shape
        qg = q[g.rows].view(b, num_q, num_kv_heads, group, -1).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Q, D]
        kg = cache_k[g.key_slots].permute(0, 2, 3, 1).to(q.dtype)  # [B, Hkv, D, S]
        vg = cache_v[g.key_slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, S, Dv]
        scores = torch.matmul(qg.reshape(b, num_kv_heads, group * num_q, -1), kg).float() * scale
        scores = scores.view(b, num_kv_heads, group, num_q, -1) + g.mask.unsqueeze(1)  # [B, Hkv, G, Q, S]
        if sink is not None:  # the sink is one more logit column with no value vector
            scores = torch.cat((scores, sink.expand(b, -1, -1, num_q, 1)), dim=-1)
            p = torch.softmax(scores, dim=-1)[..., :-1]
        else:
            p = torch.softmax(scores, dim=-1)
        p = p.to(vg.dtype).reshape(b, num_kv_heads, group * num_q, -1)
        o = torch.matmul(p, vg).view(b, num_kv_heads, group, num_q, -1)  # [B, Hkv, G, Q, Dv]
        out[g.rows] = o.permute(0, 3, 1, 2, 4).reshape(b, num_q, num_q_heads, -1)
    return out
