"""The model runner: executes one `StepPlan` (forward over paged KV, sample or verify, MTP drafts).

It owns the device-side state (paged KV tensors, per-request MTP caches) and nothing else: the
scheduler decides what runs, the engine owns requests and sampling state. Verification accepts
drafts by exact match under greedy decoding and by speculative rejection sampling otherwise, so
outputs follow the main model's distribution exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mimo.model import MiMoForCausalLM
from protocol.messages import TokenLogprobs
from replicas.engine.kv_layout import KVLayout
from replicas.engine.mtp import DraftItem, MTPDrafter, MTPState
from replicas.engine.paged_model import PagedModel, SeqInput
from replicas.engine.requests import ScheduledSeq, SeqOutput, StepOutput, StepPlan
from replicas.engine.sampler import RowState, sample
from replicas.engine.spec_decode import accept_drafts, build_target_probs
from replicas.experts.dispatch import ExpertDispatcher


class ModelRunner:
    def __init__(
        self,
        model: MiMoForCausalLM,
        layout: KVLayout,
        num_mtp_drafts: int = 0,
        max_draft_batch: int | None = None,  # see EngineConfig.max_draft_batch
        dispatcher: ExpertDispatcher | None = None,  # None: experts run inside the model
    ) -> None:
        self.paged = PagedModel(
            model,
            layout.num_full_blocks,
            layout.num_swa_blocks,
            layout.block_size,
            num_mtp_drafts,
            dispatcher,
        )
        self.drafter = MTPDrafter(self.paged, num_mtp_drafts) if num_mtp_drafts > 0 else None
        self.max_draft_batch = max_draft_batch
        self.mtp_states: dict[str, MTPState] = {}

    @torch.inference_mode()
    def execute(
        self, plan: StepPlan, rows: Mapping[str, RowState], tokens: Mapping[str, Sequence[int]]
    ) -> StepOutput:
        """rows: each scheduled request's sampling state; tokens: its committed token ids."""
        for rid in (*plan.preempted_ids, *plan.finished_ids):
            self.mtp_states.pop(rid, None)
        if not plan.scheduled:
            return StepOutput([])
        seqs = plan.scheduled
        batch = self.paged.prepare(
            [SeqInput(s.token_ids, s.start_position, s.block_table_full, s.block_table_swa) for s in seqs]
        )
        hidden = self.paged.forward(batch)
        sampled = self._sample(seqs, batch.row_starts, hidden, rows)
        drafts: list[list[int]] = [[] for _ in seqs]
        if self.drafter is not None:
            if self._drafts_pay(seqs):
                drafts = self._draft(seqs, batch.row_starts, hidden, sampled, tokens)
            else:
                # No MTP work this step: each sequence restarts its MTP caches when drafting resumes,
                # reading the skipped slots' MTP KV as it is (at most a window of stale keys: only the
                # acceptance rate drops for a while, never the output, which verification decides).
                for s in seqs:
                    self.mtp_states.pop(s.request_id, None)
        return StepOutput(
            [
                SeqOutput(s.request_id, out, d, extras)
                for s, (out, extras), d in zip(seqs, sampled, drafts, strict=True)
            ]
        )

    def _drafts_pay(self, seqs: Sequence[ScheduledSeq]) -> bool:
        """Draft only while few sequences sample (EngineConfig.max_draft_batch)."""
        limit = self.max_draft_batch
        return limit is None or sum(s.is_last_chunk for s in seqs) <= limit

    def _sample(
        self,
        seqs: Sequence[ScheduledSeq],
        row_starts: list[int],
        hidden: torch.Tensor,
        rows: Mapping[str, RowState],
    ) -> list[tuple[list[int], TokenLogprobs | None]]:
        """Per sequence: emitted tokens (accepted drafts + one) and their logprobs if requested."""
        out: list[tuple[list[int], TokenLogprobs | None]] = [([], None) for _ in seqs]
        plain = [i for i, s in enumerate(seqs) if s.is_last_chunk and not s.draft_token_ids]
        if plain:
            last_rows = [row_starts[i] + len(seqs[i].token_ids) - 1 for i in plain]
            logits = self.paged.logits(hidden[last_rows])
            result = sample(logits, [rows[seqs[i].request_id] for i in plain])
            for j, i in enumerate(plain):
                extras = None
                if result.logprobs[j] is not None:
                    extras = TokenLogprobs([float(result.logprobs[j] or 0.0)], [result.top_logprobs[j] or []])
                out[i] = ([result.token_ids[j]], extras)
        verify = [i for i, s in enumerate(seqs) if s.is_last_chunk and s.draft_token_ids]
        if not verify:
            return out
        spans = [
            (row_starts[i] + len(seqs[i].token_ids) - len(seqs[i].draft_token_ids) - 1, i) for i in verify
        ]
        verified = [hidden[first : first + len(seqs[i].draft_token_ids) + 1] for first, i in spans]
        # [sum(k+1), V], one lm_head call for every verifying sequence
        logits = self.paged.logits(verified[0] if len(verified) == 1 else torch.cat(verified))
        best = logits.argmax(dim=-1).tolist()
        offset = 0
        for _, i in spans:
            s = seqs[i]
            k = len(s.draft_token_ids)
            seq_logits = logits[offset : offset + k + 1]
            row = rows[s.request_id]
            if _plain_greedy(row):  # exact-match acceptance straight from the argmaxes
                emitted = _accept_greedy(s.draft_token_ids, best[offset : offset + k + 1])
            else:
                target = build_target_probs(seq_logits, row, s.draft_token_ids)
                emitted = accept_drafts(target, s.draft_token_ids, None, row.generator, row.is_greedy)
            out[i] = (emitted, _logprobs(seq_logits, emitted, row))
            offset += k + 1
        return out

    def _draft(
        self,
        seqs: Sequence[ScheduledSeq],
        row_starts: list[int],
        hidden: torch.Tensor,
        sampled: list[tuple[list[int], TokenLogprobs | None]],
        tokens: Mapping[str, Sequence[int]],
    ) -> list[list[int]]:
        assert self.drafter is not None
        items = []
        for s, start, (emitted, _) in zip(seqs, row_starts, sampled, strict=True):
            state = self.mtp_states.get(s.request_id)
            if state is None:  # new, re-admitted or drafting again: earlier MTP KV is taken as it is
                state = MTPState.fresh(self.drafter.num_drafts, s.start_position)
                self.mtp_states[s.request_id] = state
            num_final = len(s.token_ids) - len(s.draft_token_ids) + max(0, len(emitted) - 1)
            committed = [*tokens[s.request_id], *emitted]
            items.append(
                DraftItem(
                    state=state,
                    tokens=committed,
                    main_hidden=hidden[start : start + num_final],
                    main_start=s.start_position,
                    main_final=s.start_position + num_final,
                    swa_table=s.block_table_swa,
                    want_drafts=s.is_last_chunk,
                )
            )
        return self.drafter.run(items)


def _plain_greedy(row: RowState) -> bool:
    """Greedy with nothing that reshapes the logits (penalties, min_tokens): argmax of raw logits."""
    return row.is_greedy and not row.has_penalties and not row.min_tokens_ids


def _accept_greedy(drafts: list[int], best: list[int]) -> list[int]:
    """Drafts while they equal the target's argmax, then the argmax at the first mismatch (or bonus)."""
    for j, draft in enumerate(drafts):
        if draft != best[j]:
            return [*drafts[:j], best[j]]
    return [*drafts, best[len(drafts)]]


def _logprobs(logits: torch.Tensor, emitted: list[int], row: RowState) -> TokenLogprobs | None:
    """Raw logprobs of tokens emitted by verification (logits row j produced emitted[j])."""
    top_n = row.params.logprobs
    if top_n is None:
        return None
    logp = torch.log_softmax(logits[: len(emitted)], dim=-1)
    chosen = logp.gather(1, torch.tensor(emitted, device=logp.device).unsqueeze(1)).squeeze(1).tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in emitted]
    if top_n > 0:
        values, ids = logp.topk(top_n, dim=-1)
        top = [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)]
    return TokenLogprobs(chosen, top)
