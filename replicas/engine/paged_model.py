"""The model's forward pass over paged KV: a flat batch of sequence segments through every layer.

It reuses the `mimo` modules' weights and halves (projections, router, experts, MTP blocks) and
only replaces where K/V live: GA layers in the GA pool, SWA layers and MTP blocks in the SWA pool.
Attention metadata is built once per step per pool and shared by all layers of that type. With
remote experts a step may run as two micro-batches in ping-pong (MegaScale-Infer): while the shards
compute one micro-batch's MoE layer, attention runs the other's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from mimo.attention import Attention
from mimo.config import LayerType
from mimo.layers import DenseMLP, RotaryEmbedding
from mimo.linear import Linear
from mimo.model import DecoderLayer, MiMoForCausalLM, MTPBlock
from mimo.moe import Experts, MoE
from replicas.engine.attention_batch import AttentionBatch, Segment, build_batch, narrow_queries
from replicas.engine.fused_weights import FusedAttention, FusedMLP, RopeTable
from replicas.engine.paged_attention import PagedKV, paged_attention
from replicas.experts.dispatch import ExpertDispatcher, Pending

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [N, 1, rotary_dim] (or [N, rotary_dim])


@dataclass(frozen=True)
class SeqInput:
    """One sequence's part of a forward: tokens at consecutive positions, with its block tables."""

    token_ids: Sequence[int]
    start_position: int
    full_table: Sequence[int | None]
    swa_table: Sequence[int | None]


@dataclass(frozen=True)
class StepBatch:
    """Flat inputs and per-pool attention metadata of one forward."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    row_starts: list[int]  # first row of each sequence
    full: AttentionBatch | None
    swa: AttentionBatch
    ropes: dict[LayerType, Rope]  # per layer type this batch runs
    # two micro-batches (whole sequences each, rows in order) when the step runs in ping-pong
    micro: tuple[StepBatch, StepBatch] | None = None


class PagedModel:
    def __init__(
        self,
        model: MiMoForCausalLM,
        num_full_blocks: int,
        num_swa_blocks: int,
        block_size: int,
        num_mtp_blocks: int = 0,  # MTP blocks that get KV storage (those used for drafting)
        dispatcher: ExpertDispatcher | None = None,  # None: experts run inside this model
    ) -> None:
        self.dispatcher = dispatcher
        self.model = model
        self.config = c = model.config
        param = next(p for p in model.parameters() if not p.is_meta)
        self.device, self.dtype = param.device, model.lm_head.weight.dtype
        self.block_size = block_size
        self.window = c.sliding_window_size
        full_layers = [i for i, t in enumerate(c.layer_types) if t is LayerType.FULL]
        swa_layers = [i for i, t in enumerate(c.layer_types) if t is LayerType.SLIDING]
        # layer index -> index inside its pool; MTP block k -> SWA pool index len(swa_layers) + k
        self.pool_index = {i: j for j, i in enumerate(full_layers)} | {i: j for j, i in enumerate(swa_layers)}
        # head counts from the modules, not the config: a tensor-parallel rank holds only its share
        fa = _attention_of(model, full_layers[0]).shape if full_layers else c.full_attention
        sa = _attention_of(model, swa_layers[0]).shape if swa_layers else c.sliding_attention
        self.full_kv = PagedKV(
            len(full_layers), num_full_blocks, block_size, fa.num_kv_heads, fa.qk_head_dim, fa.v_head_dim,
            self.dtype, self.device,
        )  # fmt: skip
        self.swa_kv = PagedKV(
            len(swa_layers) + num_mtp_blocks, num_swa_blocks, block_size, sa.num_kv_heads, sa.qk_head_dim,
            sa.v_head_dim, self.dtype, self.device,
        )  # fmt: skip
        self.num_swa_main_layers = len(swa_layers)
        self.pool_heads = {
            LayerType.FULL: (fa.num_kv_heads, fa.num_q_per_kv, fa.has_sink),
            LayerType.SLIDING: (sa.num_kv_heads, sa.num_q_per_kv, sa.has_sink),
        }
        self.rope_tables = {t: RopeTable(m, self.dtype, self.device) for t, m in _rotaries(model).items()}
        # derived weights (see replicas/engine/fused_weights.py), keyed by the Attention / DenseMLP module
        self.fused = {
            id(a): FusedAttention.build(a, c.rotary_dim) for a in model.modules() if isinstance(a, Attention)
        }
        self.fused_mlp = {id(m): FusedMLP.build(m) for m in model.modules() if isinstance(m, DenseMLP)}
        for m in model.modules():  # the rest of the step's matmuls read oneDNN packs on the CPU
            if isinstance(m, Linear | Experts):
                m.pack()

    def prepare(self, seqs: Sequence[SeqInput], need_full: bool = True) -> StepBatch:
        batch = self._prepare(seqs, need_full)
        d = self.dispatcher
        if need_full and d is not None and d.use_ping_pong(len(seqs)):
            split = _half_rows(seqs)
            micro = (self._prepare(seqs[:split], True), self._prepare(seqs[split:], True))
            batch = replace(batch, micro=micro)
        return batch

    def narrow(self, batch: StepBatch, start: int, token_ids: Sequence[int]) -> StepBatch:
        """Rows [start, start + len(token_ids)) of a one-sequence SWA-only batch, fed `token_ids`: the
        MTP blocks of one sequence attend over nested slot ranges, so one batch serves all of them."""
        n = len(token_ids)
        num_kv_heads, group, _ = self.pool_heads[LayerType.SLIDING]
        cos, sin = batch.ropes[LayerType.SLIDING]
        return StepBatch(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=self.device),
            positions=batch.positions[start : start + n],
            row_starts=[0],
            full=None,
            swa=narrow_queries(batch.swa, start, n, num_kv_heads, group),
            ropes={LayerType.SLIDING: (cos[start : start + n], sin[start : start + n])},
        )

    def _prepare(self, seqs: Sequence[SeqInput], need_full: bool) -> StepBatch:
        ids: list[int] = []
        positions: list[int] = []
        row_starts = []
        full_segs, swa_segs = [], []
        for s in seqs:
            row_starts.append(len(ids))
            n = len(s.token_ids)
            full_segs.append(Segment(len(ids), n, s.start_position, s.full_table))
            swa_segs.append(Segment(len(ids), n, s.start_position, s.swa_table))
            ids.extend(s.token_ids)
            positions.extend(range(s.start_position, s.start_position + n))
        dev = self.device
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        top = max(s.start_position + len(s.token_ids) for s in seqs) - 1
        types = (LayerType.FULL, LayerType.SLIDING) if need_full else (LayerType.SLIDING,)
        full_kv, swa_kv = self.full_kv, self.swa_kv
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=pos,
            row_starts=row_starts,
            full=build_batch(
                full_segs, self.block_size, None, dev, full_kv.zero_slot, *self.pool_heads[LayerType.FULL]
            )
            if need_full
            else None,
            swa=build_batch(
                swa_segs,
                self.block_size,
                self.window,
                dev,
                swa_kv.zero_slot,
                *self.pool_heads[LayerType.SLIDING],
            ),
            ropes={t: self.rope_tables[t].lookup(pos, top) for t in types},
        )

    def _attention(
        self, attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: PagedKV, index: int,
        batch: AttentionBatch,
    ) -> torch.Tensor:  # fmt: skip
        fused = self.fused[id(attn)]
        n = x.shape[0]
        q, kv_new = fused.project(x, rope[0].view(n, 1, -1), rope[1].view(n, 1, -1))
        scratch = kv.gather_buffer(batch.gather_rows)
        out = paged_attention(q, kv_new, kv.kv[index], batch, fused.sink, scratch)  # [N, Hq * Dv]
        return attn.o_proj(out)

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """-> last hidden state [N, H] before the final norm."""
        if batch.micro is not None:
            return self._forward_ping_pong(batch.micro)
        m = self.model
        h = m.model.embed_tokens(batch.input_ids)
        ropes = batch.ropes
        for i, layer in enumerate(m.model.layers):
            assert isinstance(layer, DecoderLayer)
            if layer.layer_type is LayerType.FULL:
                assert batch.full is not None
                kv, meta = self.full_kv, batch.full
            else:
                kv, meta = self.swa_kv, batch.swa
            x = layer.input_layernorm(h)
            h = h + self._attention(layer.self_attn, x, ropes[layer.layer_type], kv, self.pool_index[i], meta)
            h = h + self._mlp(i, layer, layer.post_attention_layernorm(h))
        return h

    def _forward_ping_pong(self, micro: tuple[StepBatch, StepBatch]) -> torch.Tensor:
        """Per layer: A's attention, A's experts sent; B's attention (overlaps A's experts), B's
        experts sent; A's experts collected, then A's next attention overlaps B's experts."""
        m, d = self.model, self.dispatcher
        assert d is not None
        hs = [m.model.embed_tokens(mb.input_ids) for mb in micro]
        pending: list[tuple[Pending, torch.Tensor] | None] = [None, None]
        for i, layer in enumerate(m.model.layers):
            assert isinstance(layer, DecoderLayer)
            full = layer.layer_type is LayerType.FULL
            kv = self.full_kv if full else self.swa_kv
            for j, mb in enumerate(micro):
                waiting = pending[j]
                if waiting is not None:
                    hs[j] = hs[j] + d.collect(*waiting)
                    pending[j] = None
                meta = mb.full if full else mb.swa
                assert meta is not None
                x = layer.input_layernorm(hs[j])
                hs[j] = hs[j] + self._attention(layer.self_attn, x, mb.ropes[layer.layer_type], kv, self.pool_index[i], meta)  # fmt: skip
                x = layer.post_attention_layernorm(hs[j])
                if isinstance(layer.mlp, MoE):
                    pending[j] = (d.submit(i, x, layer.mlp.gate(x)), x)
                else:
                    hs[j] = hs[j] + self._mlp(i, layer, x)
        for j, waiting in enumerate(pending):
            if waiting is not None:
                hs[j] = hs[j] + d.collect(*waiting)
        return torch.cat(hs)

    def _mlp(self, index: int, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        mlp = layer.mlp
        if self.dispatcher is not None and isinstance(mlp, MoE):
            return self.dispatcher.run(index, x, mlp.gate(x))
        if isinstance(mlp, DenseMLP):
            return self.fused_mlp[id(mlp)](x)
        return mlp(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden).float()

    def mtp_forward(self, block: int, batch: StepBatch, h_prev: torch.Tensor) -> torch.Tensor:
        """MTP block `block` over the batch's rows: input_ids are the tokens one step ahead of each
        row's slot, positions the slots, h_prev the previous stage's hidden per row. -> [N, H]."""
        m = self.model
        mtp = m.model.mtp.layers[block]
        assert isinstance(mtp, MTPBlock)
        emb = m.model.embed_tokens(batch.input_ids)
        rope = batch.ropes[LayerType.SLIDING]
        x = mtp.eh_proj(torch.cat((mtp.enorm(emb), mtp.hnorm(h_prev)), dim=-1))
        index = self.num_swa_main_layers + block
        x = x + self._attention(mtp.self_attn, mtp.input_layernorm(x), rope, self.swa_kv, index, batch.swa)
        return x + self.fused_mlp[id(mtp.mlp)](mtp.pre_mlp_layernorm(x))

    def mtp_logits(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.mtp_logits(block, hidden).float()


def _attention_of(model: MiMoForCausalLM, index: int) -> Attention:
    layer = model.model.layers[index]
    assert isinstance(layer, DecoderLayer)
    return layer.self_attn


def _half_rows(seqs: Sequence[SeqInput]) -> int:
    """Split index in [1, len(seqs) - 1] whose first part's row count is closest to half the rows."""
    total = sum(len(s.token_ids) for s in seqs)
    best, best_gap, rows = 1, total, 0
    for k, s in enumerate(seqs[:-1], start=1):
        rows += len(s.token_ids)
        if abs(2 * rows - total) < best_gap:
            best, best_gap = k, abs(2 * rows - total)
    return best


def _rotaries(model: MiMoForCausalLM) -> dict[LayerType, RotaryEmbedding]:
    out = {}
    for t in LayerType:
        rotary = model.model.rope[t.value]
        assert isinstance(rotary, RotaryEmbedding)
        out[t] = rotary
    return out
