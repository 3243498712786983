"""Attention over paged KV blocks, in torch, for a flat batch of sequence segments.

A step feeds each sequence a segment of tokens (a prefill chunk, one decode token, or a token plus
MTP drafts) at known positions. `AttentionBatch` (`replicas.engine.attention_batch`) is built once
per step and per pool (GA or SWA):
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

import torch

from mimo.linear import runs_in_onednn
from replicas.engine.attention_batch import AttentionBatch, Band, Group
from replicas.engine.online_attention import online_attention


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
