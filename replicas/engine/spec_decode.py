"""Acceptance of speculative (MTP) draft tokens: the emitted tokens follow the target exactly.

Greedy rows accept drafts while they equal the target's argmax. Sampled rows use speculative sampling
(Leviathan et al. 2023; Chen et al. 2023): accept draft d_j with probability min(1, p_j(d_j) / q_j(d_j)),
on rejection draw from normalize(max(0, p_j - q_j)), and after k acceptances draw a bonus from p_{k+1}.

The caller builds the target rows with `build_target_probs`: run the target on [last token, d_1 .. d_k] for
logits [k+1, V]; row j is the sampler's processed distribution with d_1 .. d_j appended to the history
(penalties and min_tokens see the drafts before it), exactly what `sample` would draw from there.
Then `accept_drafts(target, drafts, q, row.generator, row.is_greedy)` and append what it returns to
`row.output_token_ids`. Logprobs of the emitted tokens come from the raw logits rows, as in `sample`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from replicas.engine.sampler import RowState, exponential_race, processed_probs_batch


def build_target_probs(logits: Tensor, row: RowState, draft_tokens: Sequence[int]) -> Tensor:
    """Target distributions [k+1, V] from the target's logits [k+1, V] at [last, d_1 .. d_k]."""
    num_drafts = len(draft_tokens)
    assert logits.shape[0] == num_drafts + 1, (tuple(logits.shape), num_drafts)
    histories = [draft_tokens[:j] for j in range(num_drafts + 1)]
    return processed_probs_batch(logits, [row] * (num_drafts + 1), histories)


def accept_drafts(
    target_probs: Tensor,
    draft_tokens: Sequence[int],
    draft_probs: Tensor | None,
    generator: torch.Generator,
    greedy: bool,
) -> list[int]:
    """Returns the accepted drafts followed by one more token (the correction or the bonus).

    target_probs [k+1, V]; draft_probs [k, V], the distributions the drafts were drawn from, or None
    when the drafts are deterministic proposals (q one-hot on the draft: accept with p_j(d_j), else draw
    from p_j with d_j removed; exact however the drafts were chosen). A sampled call draws k uniforms,
    then V per extra token, from `generator`; a greedy call draws nothing.
    """
    num_drafts = len(draft_tokens)
    assert target_probs.shape[0] == num_drafts + 1, (tuple(target_probs.shape), num_drafts)
    if greedy:
        best: list[int] = target_probs.max(dim=1).indices.tolist()  # first maximum on ties
        for j, draft in enumerate(draft_tokens):
            if draft != best[j]:
                return [*draft_tokens[:j], best[j]]
        return [*draft_tokens, best[num_drafts]]
    if num_drafts > 0:
        device = target_probs.device
        drafts = torch.tensor([list(draft_tokens)], device=device).T  # [k, 1]
        p = target_probs[:num_drafts].gather(1, drafts)  # [k, 1]
        uniform = torch.rand(num_drafts, 1, generator=generator, dtype=torch.float64, device=device)
        # u < p / q, written so a zero q (a draft its own drafter called impossible) never divides.
        accepted = uniform < p if draft_probs is None else uniform * draft_probs.gather(1, drafts) < p
        for j, (is_accepted,) in enumerate(accepted.tolist()):
            if not is_accepted:
                return [
                    *draft_tokens[:j],
                    _draw(_residual(target_probs, draft_probs, draft_tokens, j), generator),
                ]
    return [*draft_tokens, _draw(target_probs[num_drafts].clone(), generator)]


def _residual(
    target_probs: Tensor, draft_probs: Tensor | None, draft_tokens: Sequence[int], j: int
) -> Tensor:
    """max(0, p_j - q_j) [V] (unnormalised: the race does not need it). With q one-hot on d_j this is
    p_j with d_j zeroed."""
    if draft_probs is None:
        residual = target_probs[j].clone()
        residual[draft_tokens[j]] = 0.0
    else:
        residual = (target_probs[j] - draft_probs[j]).clamp_(min=0.0)
    # Rejection implies p_j(d_j) < q_j(d_j), so the residual has mass unless rounding ate it all.
    return residual if bool(residual.any()) else target_probs[j].clone()


def _draw(probs: Tensor, generator: torch.Generator) -> int:
    """One id from `probs` [V] (unnormalised is fine), consumed in place."""
    return int(exponential_race(probs.unsqueeze(0), [generator]).item())
