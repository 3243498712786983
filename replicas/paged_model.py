"""The model's forward pass over paged KV: a flat batch of sequence segments through every layer.

It reuses the `mimo` modules' weights and halves (projections, router, experts, MTP blocks) and
only replaces where K/V live: GA layers in the GA pool, SWA layers and MTP blocks in the SWA pool.
Attention metadata is built once per step per pool and shared by all layers of that type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mimo.attention import Attention
from mimo.config import LayerType
from mimo.model import DecoderLayer, MiMoForCausalLM, MTPBlock
from mimo.moe import MoE
from replicas.dispatch import ExpertDispatcher
from replicas.paged_attention import AttentionBatch, PagedKV, Segment, build_batch, paged_attention


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
        fa, sa = c.full_attention, c.sliding_attention
        self.full_kv = PagedKV(
            len(full_layers), num_full_blocks, block_size, fa.num_kv_heads, fa.qk_head_dim, fa.v_head_dim,
            self.dtype, self.device,
        )  # fmt: skip
        self.swa_kv = PagedKV(
            len(swa_layers) + num_mtp_blocks, num_swa_blocks, block_size, sa.num_kv_heads, sa.qk_head_dim,
            sa.v_head_dim, self.dtype, self.device,
        )  # fmt: skip
        self.num_swa_main_layers = len(swa_layers)

    def prepare(self, seqs: Sequence[SeqInput], need_full: bool = True) -> StepBatch:
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
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            row_starts=row_starts,
            full=build_batch(full_segs, self.block_size, None, dev) if need_full else None,
            swa=build_batch(swa_segs, self.block_size, self.window, dev),
        )

    def _attention(
        self, attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: PagedKV, index: int,
        batch: AttentionBatch,
    ) -> torch.Tensor:  # fmt: skip
        q, k, v = attn.project(x, *rope)
        out = paged_attention(q, k, v, kv.k[index], kv.v[index], batch, attn.scale, attn.attention_sink_bias)
        return attn.output(out)

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """-> last hidden state [N, H] before the final norm."""
        m = self.model
        h = m.model.embed_tokens(batch.input_ids)
        ropes = {t: m.rope(t, batch.positions, h.dtype) for t in LayerType}
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

    def _mlp(self, index: int, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        mlp = layer.mlp
        if self.dispatcher is not None and isinstance(mlp, MoE):
            return self.dispatcher.run(index, x, mlp.gate(x))
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
        rope = m.rope(LayerType.SLIDING, batch.positions, emb.dtype)
        x = mtp.eh_proj(torch.cat((mtp.enorm(emb), mtp.hnorm(h_prev)), dim=-1))
        index = self.num_swa_main_layers + block
        x = x + self._attention(mtp.self_attn, mtp.input_layernorm(x), rope, self.swa_kv, index, batch.swa)
        return x + mtp.mlp(mtp.pre_mlp_layernorm(x))

    def mtp_logits(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.mtp_logits(block, hidden).float()
