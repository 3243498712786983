"""MTP drafting: chains the MTP blocks over paged KV to propose the next k tokens of each sequence.

Block k at slot i reads token x[i+k+1] and the previous stage's hidden state at slot i (the main
model's for k = 0) and predicts x[i+k+2]. Its KV at slot i is *final* once x[i+k+1] is committed;
slots whose input is still a draft are computed provisionally and recomputed next step (same slot,
so the paged cache is simply overwritten). Per sequence we keep, per block, how many slots are
final, and when block k lags block k-1 by one slot, block k-1's hidden state at that slot
(`carry[k]`), so no stage recomputes a final slot.

A sequence's state starts at a slot (`start`): its first step after a prefix hit, a re-admission or
a pause of drafting (`EngineConfig.max_draft_batch`). Every block's KV before that slot is taken
as it is, even where it was never computed for these tokens: it only lowers the acceptance rate
until the window has moved past it, since verification decides every output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from replicas.engine.paged_model import PagedModel, SeqInput, StepBatch


@dataclass
class MTPState:
    """Per sequence: slots [0, final[k]) of block k are final; carry[k] = (slot, stage k-1 hidden).
    No block computes a slot before `start` (see the module docstring)."""

    final: list[int]
    carry: list[tuple[int, torch.Tensor] | None]
    start: int = 0

    @staticmethod
    def fresh(num_blocks: int, start: int) -> MTPState:
        return MTPState([start] * num_blocks, [None] * num_blocks, start)


@dataclass(frozen=True)
class DraftItem:
    state: MTPState
    tokens: Sequence[int]  # committed tokens of the sequence (prompt + accepted output)
    main_hidden: torch.Tensor  # [n, H] main hidden of slots [main_start, main_final), this step
    main_start: int
    main_final: int  # main-model slots [0, main_final) are final after this step
    swa_table: Sequence[int | None]
    want_drafts: bool  # False mid-prefill: only finalize what can be finalized


@dataclass
class _Stage:
    """One item's stage output this step: hidden of slots [start, start + len(hidden))."""

    hidden: torch.Tensor
    start: int
    final: int  # slots [0, final) of this stage are final

    def at(self, slot: int) -> torch.Tensor | None:
        i = slot - self.start
        return self.hidden[i : i + 1] if 0 <= i < self.hidden.shape[0] else None


class MTPDrafter:
    def __init__(self, paged: PagedModel, num_drafts: int) -> None:
        assert 0 < num_drafts <= paged.config.num_mtp_layers
        self.paged = paged
        self.num_drafts = num_drafts

    def run(self, items: Sequence[DraftItem]) -> list[list[int]]:
        """Advances every item's MTP caches; returns the drafts of items that want them."""
        drafts: list[list[int]] = [[] for _ in items]
        spans = [self._spans(it) for it in items]
        shared = self._shared_batch(items[0], spans[0]) if len(items) == 1 else None
        prev = [_Stage(it.main_hidden, it.main_start, it.main_final) for it in items]
        # carries for the next step; block k+1 still reads the old carry[k+1] in this step
        new_carry = [list(it.state.carry) for it in items]
        for k in range(self.num_drafts):
            seqs, inputs, owners = [], [], []
            for idx, it in enumerate(items):
                lo, _, hi = spans[idx][k]
                if hi <= lo:
                    continue
                inputs.append(self._stage_input(it.state.carry[k], prev[idx], lo, hi))
                toks = [self._token(it, drafts[idx], i + k + 1) for i in range(lo, hi)]
                seqs.append(SeqInput(toks, lo, (), it.swa_table))
                owners.append(idx)
            outs = self._forward(k, seqs, inputs, owners, items, drafts, shared)
            for idx, it in enumerate(items):
                lo, final_new, _ = spans[idx][k]
                hidden = outs.get(idx, it.main_hidden[:0])
                stage = _Stage(hidden, lo, final_new)
                it.state.final[k] = final_new
                if k + 1 < self.num_drafts:
                    # where `_spans` resumes block k+1 next step: its final slots, never before the start
                    resume = max(min(final_new, len(it.tokens) - 2 - k), it.state.start)
                    new_carry[idx][k + 1] = self._next_carry(it.state.carry[k + 1], stage, resume)
                prev[idx] = stage
        for it, carry in zip(items, new_carry, strict=True):
            it.state.carry = carry
        return drafts

    def _spans(self, it: DraftItem) -> list[tuple[int, int, int]]:
        """Per block: (lo, final, hi): it computes slots [lo, hi), of which [0, final) are then final."""
        out = []
        final = it.main_final  # the previous stage's final slots; the main model's for block 0
        for k in range(self.num_drafts):
            final = min(final, len(it.tokens) - 1 - k)
            lo = max(it.state.final[k], it.state.start)
            out.append((lo, final, it.main_final if it.want_drafts else final))
        return out

    def _shared_batch(self, it: DraftItem, spans: list[tuple[int, int, int]]) -> tuple[int, StepBatch] | None:
        """One sequence: every block computes a slot range inside [min lo, max hi), so the attention
        metadata is built once for that range and narrowed per block. -> (first slot, batch)."""
        live = [(lo, hi) for lo, _, hi in spans if hi > lo]
        if not live:
            return None
        lo, hi = min(lo for lo, _ in live), max(hi for _, hi in live)
        return lo, self.paged.prepare([SeqInput([0] * (hi - lo), lo, (), it.swa_table)], need_full=False)

    def _forward(
        self,
        k: int,
        seqs: list[SeqInput],
        inputs: list[torch.Tensor],
        owners: list[int],
        items: Sequence[DraftItem],
        drafts: list[list[int]],
        shared: tuple[int, StepBatch] | None,
    ) -> dict[int, torch.Tensor]:
        if not seqs:
            return {}
        if shared is not None:
            (seq,) = seqs
            batch = self.paged.narrow(shared[1], seq.start_position - shared[0], seq.token_ids)
        else:
            batch = self.paged.prepare(seqs, need_full=False)
        h_out = self.paged.mtp_forward(k, batch, inputs[0] if len(inputs) == 1 else torch.cat(inputs))
        ends = [*batch.row_starts[1:], h_out.shape[0]]
        outs = {}
        last_rows = []
        for idx, start, end in zip(owners, batch.row_starts, ends, strict=True):
            outs[idx] = h_out[start:end]
            if items[idx].want_drafts:
                last_rows.append((idx, end - 1))
        if last_rows:
            rows = [r for _, r in last_rows]
            # one row (batch 1) is a slice; more rows one gather
            last = h_out[rows[0] : rows[0] + 1] if len(rows) == 1 else h_out[rows]
            tokens = self.paged.mtp_logits(k, last).argmax(-1).tolist()
            for (idx, _), token in zip(last_rows, tokens, strict=True):
                drafts[idx].append(token)
        return outs

    @staticmethod
    def _stage_input(carry: tuple[int, torch.Tensor] | None, prev: _Stage, lo: int, hi: int) -> torch.Tensor:
        """Previous-stage hidden for slots [lo, hi): this step's rows, led by the carry if lagging."""
        rows = prev.hidden[max(0, lo - prev.start) : hi - prev.start]
        if lo < prev.start:
            assert carry is not None and carry[0] == lo and lo == prev.start - 1, "MTP stage lag > 1 slot"
            rows = torch.cat((carry[1], rows))
        assert rows.shape[0] == hi - lo
        return rows

    @staticmethod
    def _next_carry(
        old: tuple[int, torch.Tensor] | None, stage: _Stage, resume: int
    ) -> tuple[int, torch.Tensor] | None:
        """Block k+1 resumes at slot `resume`; keep this stage's hidden there if not recomputed."""
        if resume >= stage.final:
            return None
        hidden = stage.at(resume)
        if hidden is None:
            assert old is not None and old[0] == resume, "lost the hidden state block k+1 resumes from"
            return old
        return (resume, hidden.detach().clone())

    @staticmethod
    def _token(it: DraftItem, drafts: list[int], position: int) -> int:
        n = len(it.tokens)
        return it.tokens[position] if position < n else drafts[position - n]
