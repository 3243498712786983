"""Attention over paged KV blocks, in torch, for a flat batch of sequence segments.

A step feeds each sequence a segment of tokens (a prefill chunk, one decode token, or a token plus
MTP drafts) at known positions. `AttentionBatch` is built once per step and per pool (GA or SWA):
where each new token's K/V goes (flat slot = block * block_size + offset) and, per group of
segments with the same query count, which slots to gather and the visibility mask (causal, and on
SWA the window). Every layer of that type reuses it: one write, one gather, three batched matmul
ops per group. The decode step is bound by per-op overhead, so the layout is chosen to need few ops:
K and V of a token sit side by side in one row per KV head (one write, one gather), the cache is
head-major so a gather is already [heads x seqs, keys, dims] (one dim-0 gather of whole rows over
the cache seen as [heads x slots, dims]: at batch 8 3.5x faster than a dim-1 gather of slots, about
equal at batch 1), and each pool's last slot is kept zero:
padding reads it, and with sinks it is one more key whose score is the sink (put in by the mask)
and whose value is zero, so the softmax needs no extra column handling.

On the CPU a bf16/fp16 cache is attended in fp32: the query and each gathered K/V row are upcast
(exactly) and the matmuls run in MKL, the output rounded once at the end. oneDNN, which runs
low-precision bmm, compiles and caches a kernel for every shape it sees (~0.5-1 MB each, up to
1,024), and attention shapes change with every batch size, prefill chunk and key count: a bf16
engine grew by ~900 MB under prompts of random lengths. In fp32 nothing is cached per shape, and
it is faster here too (interleaved A/Bs in one process, bf16 tiny model, median decode step: batch 1
4.52 -> 4.16 ms, batch 8 7.57 -> 6.89 ms, batch 32 11.49 -> 11.12 ms; a 2,048-token prefill 357 ->
326 ms). Scores and probabilities are no longer rounded to bf16 in between, so the result is
closer to fp32 attention than before. CUDA keeps its bf16 matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from mimo.linear import runs_in_onednn
from replicas.engine.online_attention import Causal, causal_for, online_attention

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
# (~0.5 ms per new shape); CPU attention now runs in fp32 (module docstring) and no longer needs
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


class PagedKV:
    """K/V storage of one pool: per layer [Hkv, num_blocks * block_size + 1, Dqk + Dv]; row [h, s]
    holds K then V of KV head h at slot s. The extra last slot (`zero_slot`) stays zero."""

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
        self.qk_head_dim = qk_head_dim
        self.zero_slot = slots
        self._gather = torch.empty(0, qk_head_dim + v_head_dim, dtype=dtype, device=device)
        self.kv = [
            torch.zeros(num_kv_heads, slots + 1, qk_head_dim + v_head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]

    def gather_buffer(self, rows: int) -> torch.Tensor:
        """A [rows, Dqk + Dv] buffer that every layer's gather of this pool writes into in turn (its
        K/V is used up before the next layer's gather): the same memory, warm in the cache, instead
        of a fresh one per layer."""
        if self._gather.shape[0] < rows:
            self._gather = self._gather.new_empty(rows, self._gather.shape[1])
        return self._gather

    @property
    def bytes(self) -> int:
        """Bytes of the usable slots (the zero slot aside)."""
        return sum(t[:, : self.zero_slot].numel() * t.element_size() for t in self.kv)


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
    # head-major rows of the cache seen as [Hkv * slots', D]: one dim-0 gather (module docstring)
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


def paged_attention(
    q: torch.Tensor,
    kv_new: torch.Tensor,
    cache: torch.Tensor,
    batch: AttentionBatch,
    sink: torch.Tensor | None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [N, Hq, Dqk] (already scaled by the softmax scale), kv_new [N, Hkv, Dqk + Dv] (V already
    value-scaled): writes the new K/V into `cache` [Hkv, slots + 1, Dqk + Dv], then attends.
    sink [Hkv, 1, G, 1, 1] fp32 per query head, or None. scratch: a [>= batch.gather_rows, Dqk + Dv]
    buffer the K/V gather writes into (`PagedKV.gather_buffer`), or None for a fresh one. -> [N, Hq * Dv].

    Written out with matmuls rather than SDPA: q/k and v head dims differ, which sends SDPA to its
    slow math path, and GQA here needs only a view (query heads of one KV head side by side).
    """
    num_q_heads, dqk = q.shape[1], q.shape[2]
    num_kv_heads, width = cache.shape[0], cache.shape[2]
    dv = width - dqk
    group = num_q_heads // num_kv_heads
    cache.index_copy_(1, batch.write_slots, _as(kv_new.transpose(0, 1), cache.dtype))
    out = None if batch.groups[0].rows is None else q.new_empty(q.shape[0], num_q_heads * dv)
    upcast = runs_in_onednn(cache)  # attended in fp32 instead (module docstring)
    for g in batch.groups:
        b, nq = g.num_seqs, g.num_q
        qs = q if g.rows is None else q.index_select(0, g.rows)
        if upcast:
            qs = qs.float()
        # [Hkv * B, G * Q, Dqk]: query heads of one KV head side by side, per sequence
        qg = qs.reshape(b, nq, num_kv_heads, group, dqk).permute(2, 0, 3, 1, 4).reshape(-1, group * nq, dqk)
        flat, rows = cache.view(-1, width), g.key_rows
        out_rows = None if scratch is None else scratch[: rows.shape[0]]
        gathered = torch.index_select(flat, 0, rows, out=out_rows)  # [Hkv * B * S, Dqk + Dv]
        if upcast:
            gathered = gathered.float()
        kv = gathered.view(num_kv_heads * b, -1, width)  # [Hkv * B, S, Dqk + Dv]
        k, v = kv[..., :dqk].transpose(1, 2), kv[..., dqk:]
        if g.causal is not None:
            num_keys = k.shape[-1] - (1 if sink is not None else 0)
            o = online_attention(qg, k, v, num_keys, g.causal, sink, num_kv_heads, group)
        elif g.band is not None:
            o = _banded(qg, k, v, g, g.band, sink, num_kv_heads, group)
        else:
            o = _full(qg, k, v, g, sink, num_kv_heads, group)
        o = o.view(num_kv_heads, b, group, nq, dv).permute(1, 3, 0, 2, 4)  # [B, Q, Hkv, G, Dv]
        if out is None:
            return _as(o.reshape(b * nq, num_q_heads * dv), q.dtype)
        out[g.rows] = _as(o.reshape(b * nq, num_q_heads * dv), out.dtype)
    assert out is not None
    return out


def _full(
    qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Group, sink: torch.Tensor | None,
    num_kv_heads: int, group: int,
) -> torch.Tensor:  # fmt: skip
    """Every query against every gathered key: [Hkv * B, G * Q, Dv]."""
    b, nq = g.num_seqs, g.num_q
    if sink is not None:
        m = g.mask
        assert m is not None
        s = m.shape[-1]
        mask = torch.cat(
            (m.expand(num_kv_heads, b, group, nq, s), sink.expand(num_kv_heads, b, group, nq, 1)), dim=-1
        ).view(num_kv_heads * b, group * nq, s + 1)
    else:
        assert g.mask_3d is not None
        mask = g.mask_3d
    return torch.bmm(_softmax(qg, k, mask, v.dtype), v)


def _banded(
    qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Group, band: Band, sink: torch.Tensor | None,
    num_kv_heads: int, group: int,
) -> torch.Tensor:  # fmt: skip
    """A prefill chunk in query blocks, each against only the keys it can see: the same result as
    `_full` with fewer scores and no mask expanded per head: a block sees window + block keys
    instead of window + chunk (a 2,048-query chunk with the release's 128 window: 8.5x fewer). The
    sink key (the last, zero) joins every block."""
    b, nq = g.num_seqs, g.num_q
    assert g.mask is not None
    num_keys = k.shape[-1] - (1 if sink is not None else 0)
    size = band.block
    q4 = qg.view(num_kv_heads * b, group, nq, -1)
    outs = []
    for qs in range(0, nq, size):
        qe = min(nq, qs + size)
        lo, hi = band.keys_for(qs, qe, num_keys)
        qb = q4[:, :, qs:qe].reshape(num_kv_heads * b, group * (qe - qs), -1)
        mb = g.mask[..., qs:qe, lo:hi].expand(num_kv_heads, b, group, qe - qs, hi - lo)
        kb, vb = k[..., lo:hi], v[:, lo:hi]
        if sink is not None:
            mb = torch.cat((mb, sink.expand(num_kv_heads, b, group, qe - qs, 1)), dim=-1)
            kb = torch.cat((kb, k[..., num_keys:]), dim=-1)
            vb = torch.cat((vb, v[:, num_keys:]), dim=1)
        mask = mb.reshape(num_kv_heads * b, group * (qe - qs), -1)
        outs.append(torch.bmm(_softmax(qb, kb, mask, v.dtype), vb).view(num_kv_heads * b, group, qe - qs, -1))
    return torch.cat(outs, dim=2).view(num_kv_heads * b, group * nq, -1)


def _softmax(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """softmax(q @ k + mask) over keys, scores in fp32."""
    if q.dtype == torch.float32 and k.dtype == torch.float32:
        return torch.softmax(torch.baddbmm(mask, q, k), dim=-1)
    # low precision (CUDA; the CPU upcasts before this): scores and softmax in fp32. A gathered k is a
    # transposed view of rows that also hold V, copied as rows and handed over transposed-contiguous
    # (on the CPU's oneDNN this was 10 us against 150 us for the bmm's own transposing copy).
    if not k.is_contiguous():
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    return torch.softmax(torch.bmm(q, k.to(q.dtype)).float() + mask, dim=-1).to(out_dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
