"""Speculative decoding acceptance: exact greedy rules, and sampled output distributed as the target."""

import bisect
import math
from collections.abc import Callable

import pytest
import torch

from protocol.sampling import SamplingParams
from replicas.engine.sampler import RowState, make_generator, processed_probs
from replicas.engine.spec_decode import accept_drafts, build_target_probs

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_hot_rows(ids: list[int], vocab: int = 5) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float()


def test_greedy_accepts_while_drafts_match_the_argmax() -> None:
    """Catches accepting past the first mismatch, a missing correction or bonus token, or greedy
    acceptance consuming the request's generator."""
    target = _one_hot_rows([2, 4, 1, 3])
    generator = make_generator(0)
    state = generator.get_state()
    assert accept_drafts(target, [2, 4, 1], None, generator, greedy=True) == [2, 4, 1, 3]
    assert accept_drafts(target, [2, 4, 0], None, generator, greedy=True) == [2, 4, 1]
    assert accept_drafts(target, [0, 4, 1], None, generator, greedy=True) == [2]
    assert accept_drafts(target[:1], [], None, generator, greedy=True) == [2]
    assert torch.equal(generator.get_state(), state)


def test_greedy_tie_resolves_to_the_lowest_id_like_the_sampler() -> None:
    """Catches a tie-break that differs from the sampler's (greedy MTP output would diverge from
    plain decoding)."""
    target = torch.tensor([[0.4, 0.4, 0.2], [0.1, 0.2, 0.7]])
    assert accept_drafts(target, [1], None, make_generator(0), greedy=True) == [0]
    assert accept_drafts(target, [0], None, make_generator(0), greedy=True) == [0, 2]


def test_sampled_draft_equal_to_target_is_always_accepted_then_bonus_from_last_row() -> None:
    """Catches acceptance tested as u <= p/q (a draft lost when p == q), and a bonus token missing or
    drawn from any row but the last (here one-hot on 5, unlike every other row)."""
    generator = make_generator(1)
    probs = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(3)), dim=1)
    probs[3] = torch.nn.functional.one_hot(torch.tensor(5), 7).float()
    for _ in range(200):
        assert accept_drafts(probs, [3, 0, 6], probs[:3], generator, greedy=False) == [3, 0, 6, 5]


def test_impossible_draft_is_always_rejected_and_never_re_emitted() -> None:
    """Catches a residual that still contains the rejected draft (p - q must zero it), in both the
    q-given and the one-hot case."""
    target = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    generator = make_generator(2)
    for draft_probs in (torch.tensor([[0.6, 0.2, 0.2]]), None):
        outs = {tuple(accept_drafts(target, [0], draft_probs, generator, greedy=False)) for _ in range(100)}
        assert outs == {(1,), (2,)}


def test_certain_draft_is_always_accepted_in_the_one_hot_case() -> None:
    """Catches one-hot drafts accepted with a probability other than p(d) (here p(d) = 1)."""
    target = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    generator = make_generator(3)
    assert all(accept_drafts(target, [1], None, generator, greedy=False)[0] == 1 for _ in range(100))


def test_target_probs_see_the_drafts_before_them() -> None:
    """Catches target rows built without the earlier drafts in the penalty history, which makes
    speculative output differ in distribution from plain sampling."""
    logits = torch.tensor([[1.0, 2.0, 0.5, 0.0], [1.0, 2.0, 0.5, 0.0], [1.0, 2.0, 0.5, 0.0]])
    row = RowState(SamplingParams(temperature=0.8, frequency_penalty=1.0), [0], [3], make_generator(0))
    drafts = [1, 1]
    target = build_target_probs(logits, row, drafts)
    for j in range(3):
        assert torch.equal(target[j], processed_probs(logits[j], row, drafts[:j]))
    assert target[0, 1] > target[1, 1] > target[2, 1]  # each earlier draft of 1 penalises 1 again


# Small context-dependent target and draft "models": row c is the next-token distribution after token c,
# row VOCAB the one at the start. Tables of moderate spread keep every joint cell's expected count >= 5.
# 6k runs keep the test near a second; the bugs it targets give chi-square statistics in the hundreds.
VOCAB, NUM_DRAFTS, NUM_RUNS = 6, 3, 6_000
START = VOCAB


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(VOCAB + 1, VOCAB, generator=generator) * 0.7, dim=1)
    draft = torch.softmax(torch.randn(VOCAB + 1, VOCAB, generator=generator) * 1.2, dim=1)
    return target, draft


def _chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    expected = expected_probs.flatten().double() * counts.sum()
    return float(((counts.flatten() - expected) ** 2 / expected).sum()), expected.numel() - 1


def _chi_square_bound(dof: int, z: float = 3.72) -> float:
    """Wilson-Hilferty upper quantile of chi-square(dof); z = 3.72 is a 1e-4 tail."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def _first_two_tokens(
    target: torch.Tensor, propose: Callable[[int], tuple[list[int], torch.Tensor | None]], seed: int
) -> torch.Tensor:
    """Runs speculative steps from the start until two tokens exist, NUM_RUNS times; counts (t1, t2)."""
    generator = make_generator(seed)
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for _ in range(NUM_RUNS):
        tokens: list[int] = []
        while len(tokens) < 2:
            context = tokens[-1] if tokens else START
            drafts, draft_probs = propose(context)
            rows = target[[context, *drafts]]  # [k+1, V]: the target after each prefix
            tokens += accept_drafts(rows, drafts, draft_probs, generator, greedy=False)
        counts[tokens[0], tokens[1]] += 1
    return counts


def _sampled_proposer(draft: torch.Tensor, seed: int) -> Callable[[int], tuple[list[int], torch.Tensor]]:
    """Draws a chain of NUM_DRAFTS from the draft table by inverse CDF (cheap in Python)."""
    cdf = draft.double().cumsum(dim=1).tolist()
    uniforms = iter(
        torch.rand(NUM_RUNS * 2 * NUM_DRAFTS, generator=torch.Generator().manual_seed(seed)).tolist()
    )

    def propose(context: int) -> tuple[list[int], torch.Tensor]:
        drafts, contexts = [], []
        for _ in range(NUM_DRAFTS):
            contexts.append(context)
            context = min(bisect.bisect_right(cdf[context], next(uniforms)), VOCAB - 1)
            drafts.append(context)
        return drafts, draft[contexts]

    return propose


def _greedy_proposer(draft: torch.Tensor) -> Callable[[int], tuple[list[int], None]]:
    """Deterministic drafts (the draft table's argmax chain), as greedy MTP heads propose them."""
    best = draft.argmax(dim=1).tolist()

    def propose(context: int) -> tuple[list[int], None]:
        drafts = []
        for _ in range(NUM_DRAFTS):
            context = best[context]
            drafts.append(context)
        return drafts, None

    return propose


@pytest.mark.parametrize("one_hot", [False, True])
def test_sampled_output_is_distributed_as_the_target(one_hot: bool) -> None:
    """Catches any deviation from the target distribution (a residual of p instead of max(0, p - q),
    acceptance with p instead of p / q, a bonus from the wrong row) with chi-square tests on the first
    token and on the first two tokens jointly over 6k seeded runs. (Deterministic one-hot acceptance is
    exact for any way of choosing drafts, so the one-hot case needs no particular proposer.)"""
    target, draft = _tables(seed=11 if one_hot else 12)
    propose = _greedy_proposer(draft) if one_hot else _sampled_proposer(draft, seed=13)
    counts = _first_two_tokens(target, propose, seed=14)
    first = target[START]
    joint = first[:, None] * target[:VOCAB]  # P(t1) P(t2 | t1)
    assert float(joint.min()) * NUM_RUNS >= 5
    for observed, expected in ((counts.sum(dim=1), first), (counts, joint)):
        chi_square, dof = _chi_square(observed, expected)
        assert chi_square < _chi_square_bound(dof), (chi_square, dof)
