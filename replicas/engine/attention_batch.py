"""What one step's attention reads, built once per step and per KV pool (GA or SWA): where each
new token's K/V goes (flat slot = block * block_size + offset) and, per group of segments with the
same query count, which cache rows to gather and which keys each query may see (causal, and on SWA
the window). Every layer of the pool's type reuses it (`replicas.engine.paged_attention` attends
with it). The layout it gathers from is `PagedKV`'s: head-major rows with K and V side by side, and
a zero slot that padding (and a sink) reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from replicas.engine.online_attention import Causal, causal_for

# Prefill chunks on SWA pools attend in query blocks (`Band`) of max(window, BANDED_MIN_QUERIES)
# queries once a group has at least BANDED_MIN_BLOCKS of them; on GA pools a group of at least
# ONLINE_MIN_QUERIES queries per segment attends key block by key block with an online softmax
# (`online_attention`), and no mask over all its keys is made. Decode and MTP steps attend whole (`_full`).
BANDED_MIN_BLOCKS = 4
BANDED_MIN_QUERIES = 32
ONLINE_MIN_QUERIES = 16
# Gathered key counts are rounded up to a multiple of this (masked zero-slot keys fill the rest),
# capped at the most a window can show: a GA decode step's key count otherwise grows by one each
# step, a new shape for any kernel compiled or tuned per shape. It was added for oneDNN's bf16 bmm
# (~0.5 ms per new shape); CPU attention now runs in fp32 (`replicas.engine.paged_attention`'s docstring) and no longer needs
# it, and it costs at most 15 masked keys per sequence.
KEY_BUCKET = 16


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

    rows: torch.Tensor | None  # [B * Q] flat row of each query, (seq, query) order; None: all rows, in order
    num_seqs: int
    num_q: int
    key_rows: torch.Tensor  # [Hkv * B * S] row of each gathered key in the cache seen as [Hkv * slots', D]
    # (head-major: head h's slot s is row h * slots' + s; padding and the sink read the zero slot)
    # [1, B, 1, Q, S'] additive, 0 visible / -inf hidden; S' = S - 1 with sinks; None with `causal`
    mask: torch.Tensor | None
    # [Hkv * B, G * Q, S] the mask per score row (pools without sinks, attended whole)
    mask_3d: torch.Tensor | None
    band: Band | None = None  # set: attend in query blocks (SWA prefill chunks)
    causal: Causal | None = None  # set: GA prefill chunks, online softmax over key blocks


@dataclass(frozen=True)
class Band:
    """Query blocks of a long SWA group, each against only the keys it can see. Query q of a segment
    sees gathered keys from q + shift - window up to q + shift, where shift = its start position -
    its first gathered key's position (`min_shift`..`max_shift` over the group's segments; equal
    for one segment)."""

    block: int  # queries per block
    window: int
    min_shift: int
    max_shift: int

    def keys_for(self, q_start: int, q_end: int, num_keys: int) -> tuple[int, int]:
        """[lo, hi): the gathered keys any of queries [q_start, q_end) may see."""
        lo = max(0, q_start + self.min_shift - self.window)
        return lo, min(num_keys, q_end + self.max_shift)

    def shifted(self, start: int) -> Band:
        """The band of queries start.. of this group, renumbered from 0."""
        return Band(self.block, self.window, self.min_shift + start, self.max_shift + start)


def band_for(num_q: int, window: int | None, starts: torch.Tensor, firsts: torch.Tensor) -> Band | None:
    """The band of an SWA group of `num_q` queries per segment (its segments' start and first key
    positions), or None when it is attended whole (decode and MTP steps: no tensor op) or is GA."""
    if window is None:
        return None
    block = max(window, BANDED_MIN_QUERIES)
    if num_q < BANDED_MIN_BLOCKS * block:
        return None
    shifts = starts - firsts
    return Band(block, window, int(shifts.min()), int(shifts.max()))


@dataclass(frozen=True)
class AttentionBatch:
    write_slots: torch.Tensor  # [N] flat slot of every new token, in row order
    groups: list[Group]

    @cached_property
    def gather_rows(self) -> int:
        """The most K/V rows one group gathers (the size of the pool's shared gather buffer)."""
        return max(g.key_rows.shape[0] for g in self.groups)


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
    segments: Sequence[Segment],
    block_size: int,
    window: int | None,
    device: torch.device,
    zero_slot: int,
    num_kv_heads: int,
    num_q_per_kv: int,
    has_sink: bool,
) -> AttentionBatch:
    """Slots and masks for one pool. window=None: global attention (every earlier key)."""
    write: list[int] = []
    by_q: dict[int, list[int]] = {}
    for i, seg in enumerate(segments):
        table = seg.block_table
        for p in range(seg.start_position, seg.start_position + seg.num_tokens):
            block = table[p // block_size]
            assert block is not None, "writing into a released block"
            write.append(block * block_size + p % block_size)
        by_q.setdefault(seg.num_tokens, []).append(i)
    tables = _tables(segments)
    starts = torch.tensor([seg.start_position for seg in segments])
    groups = []
    for num_q, idx in by_q.items():
        segs = [segments[i] for i in idx]
        first_rows = [seg.row_start for seg in segs]
        in_order = len(by_q) == 1  # one group: its rows are every row, in order
        rows = None
        if not in_order:
            rows = torch.tensor([r + q for r in first_rows for q in range(num_q)], device=device)
        sel = torch.tensor(idx) if not in_order else None
        groups.append(
            _group(
                tables if sel is None else tables[sel],
                starts if sel is None else starts[sel],
                rows,
                num_q,
                block_size,
                window,
                device,
                zero_slot,
                (num_kv_heads, num_q_per_kv, has_sink),
            )
        )
    return AttentionBatch(torch.tensor(write, dtype=torch.long, device=device), groups)


def narrow_queries(
    batch: AttentionBatch, start: int, num_rows: int, num_kv_heads: int, group: int
) -> AttentionBatch:
    """Queries [start, start + num_rows) of a one-sequence batch (one group, rows in order), writing
    only their K/V: the same keys are gathered, and their mask rows already hide every key they must
    not see (later positions, or ones outside the window), so each query sees what a batch built for
    these rows shows it; the extra keys get weight exactly 0."""
    (g,) = batch.groups
    assert g.rows is None and g.num_seqs == 1 and start >= 0 and start + num_rows <= g.num_q
    assert g.mask is not None, "narrowing a GA batch"
    mask = g.mask[:, :, :, start : start + num_rows]  # [1, 1, 1, Q', S']
    mask_3d = None
    if g.mask_3d is not None:
        mask_3d = mask.expand(num_kv_heads, 1, group, num_rows, mask.shape[-1]).reshape(
            num_kv_heads, group * num_rows, mask.shape[-1]
        )
    write = batch.write_slots[start : start + num_rows]
    band = None if g.band is None else g.band.shifted(start)
    return AttentionBatch(write, [Group(None, 1, num_rows, g.key_rows, mask, mask_3d, band)])


def _group(
    tables: torch.Tensor,
    starts: torch.Tensor,
    rows: torch.Tensor | None,
    num_q: int,
    block_size: int,
    window: int | None,
    device: torch.device,
    zero_slot: int,
    heads: tuple[int, int, bool],
) -> Group:
    """tables [B, blocks], starts [B]: one attention call's gather indices and mask."""
    num_kv_heads, group, has_sink = heads
    b = starts.shape[0]
    ends = starts + num_q  # exclusive
    firsts = torch.zeros_like(starts) if window is None else (starts - window).clamp(min=0)
    num_keys = -(-int((ends - firsts).max()) // KEY_BUCKET) * KEY_BUCKET
    if window is not None:
        num_keys = min(num_keys, window + num_q)
    k_pos = firsts[:, None] + torch.arange(num_keys)[None, :]  # [B, S']
    in_range = k_pos < ends[:, None]
    k_pos = torch.where(in_range, k_pos, firsts[:, None])
    slots = tables.gather(1, k_pos // block_size) * block_size + k_pos % block_size
    slots = torch.where(in_range, slots, zero_slot)
    if has_sink:
        slots = torch.cat((slots, torch.full((b, 1), zero_slot)), dim=1)  # [B, S' + 1]
    # head-major rows of the cache seen as [Hkv * slots', D]: one dim-0 gather (paged_attention's docstring)
    key_rows = (torch.arange(num_kv_heads)[:, None] * (zero_slot + 1) + slots.view(1, -1)).view(-1)
    if window is None and num_q >= ONLINE_MIN_QUERIES:
        # no [B, Q, S'] positions and mask: ~400 MB for a 512-query chunk at 60K keys; made per key block
        return Group(rows, b, num_q, key_rows.to(device), None, None, None, causal_for(starts, device))
    q_pos = starts[:, None] + torch.arange(num_q)[None, :]  # [B, Q]
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, Q, S']
    visible = (delta >= 0) & in_range[:, None, :]
    if window is not None:
        visible &= delta <= window
    mask = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf"))
    mask = mask.view(1, b, 1, num_q, num_keys).to(device)
    band = band_for(num_q, window, starts, firsts)
    mask_3d = None
    if not has_sink and band is None:
        mask_3d = mask.expand(num_kv_heads, b, group, num_q, num_keys).reshape(
            num_kv_heads * b, group * num_q, num_keys
        )
    return Group(rows, b, num_q, key_rows.to(device), mask, mask_3d, band)
