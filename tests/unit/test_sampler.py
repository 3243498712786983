"""Sampler: exact penalties and masks, greedy ties, seeded per-request determinism, raw logprobs."""

import math

import pytest
import torch

from protocol.sampling import SamplingParams
from replicas.engine.sampler import (
    RowState,
    exponential_race,
    make_generator,
    penalised_logits,
    processed_probs,
    processed_probs_batch,
    sample,
)

NEG_INF = float("-inf")


pytestmark = pytest.mark.usefixtures("one_thread")


def _row(params: SamplingParams, prompt=(), output=(), eos=(), seed: int | None = 0) -> RowState:
    return RowState(params, list(prompt), list(output), make_generator(seed), tuple(eos))


def _kept(probs: torch.Tensor) -> set[int]:
    return set(probs.nonzero().flatten().tolist())


def _chi_square_bound(dof: int, z: float = 3.72) -> float:
    """Wilson-Hilferty upper quantile of chi-square(dof); z = 3.72 is a 1e-4 tail."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


# Probabilities that are exact binary fractions, so masks and sums have no rounding at the boundaries.
HALVING_LOGITS = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]).log()


def test_penalties_give_exact_logits() -> None:
    """Catches repetition applied to output only (vLLM: prompt + output), presence/frequency applied to
    the prompt, multiplication of positive logits (must divide), or penalties in the wrong order."""
    logits = torch.tensor([[2.0, -1.0, 4.0, 0.5, -2.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    row = _row(params, prompt=[0, 4], output=[2, 2, 3])
    # 0: prompt, 2 / 2. 2: output x2, 4 / 2 - 0.5 * 2 - 0.25. 3: output x1, 0.5 / 2 - 0.5 - 0.25.
    # 4: prompt and negative, -2 * 2. 1 and 5: unseen.
    expected = torch.tensor([[1.0, -1.0, 0.75, -0.5, -4.0, 1.0]])
    assert torch.equal(penalised_logits(logits, [row]), expected)
    # An extra (draft) token counts as output: 5 becomes 1 / 2 - 0.5 - 0.25.
    with_extra = penalised_logits(logits, [row], [[5]])
    assert torch.equal(with_extra, torch.tensor([[1.0, -1.0, 0.75, -0.5, -4.0, -0.25]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 4.0, 0.5, -2.0, 1.0]])), "input modified"


def test_penalty_cache_follows_appended_output() -> None:
    """Catches stale cached output counts after the engine appends tokens between steps."""
    logits = torch.zeros(1, 4)
    row = _row(SamplingParams(frequency_penalty=1.0), output=[1])
    assert penalised_logits(logits, [row])[0].tolist() == [0.0, -1.0, 0.0, 0.0]
    row.output_token_ids.extend([1, 3])
    assert penalised_logits(logits, [row])[0].tolist() == [0.0, -2.0, 0.0, -1.0]


def test_penalties_only_touch_rows_that_ask() -> None:
    """Catches one row's penalties (or history) leaking into its neighbours in the batch."""
    logits = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    rows = [
        _row(SamplingParams(), output=[0, 1, 2]),
        _row(SamplingParams(presence_penalty=1.0), output=[2]),
        _row(SamplingParams(repetition_penalty=0.5), prompt=[0]),
    ]
    expected = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 2.0], [2.0, 2.0, 3.0]])
    assert torch.equal(penalised_logits(logits, rows), expected)


def test_min_tokens_masks_stop_ids_and_eos_until_reached() -> None:
    """Catches EOS/stop ids left available before min_tokens (early stop), masked after it, or EOS
    masked despite ignore_eos (where EOS is an ordinary token)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 3.0, 4.0]])
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    short = _row(params, output=[0], eos=[5])
    assert penalised_logits(logits, [short])[0].tolist() == [0.0, 1.0, 2.0, NEG_INF, 3.0, NEG_INF]
    assert sample(logits, [short]).token_ids == [4]
    # A draft token as extra history reaches min_tokens: nothing masked.
    assert torch.equal(penalised_logits(logits, [short], [[1]]), logits)
    done = _row(params, output=[0, 0], eos=[5])
    assert sample(logits, [done]).token_ids == [3]
    ignoring = _row(
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,), ignore_eos=True), eos=[5]
    )
    assert sample(logits, [ignoring]).token_ids == [5]


def test_greedy_ties_take_the_lowest_id_and_draw_nothing() -> None:
    """Catches a tie broken towards a later id (greedy outputs would differ from the reference) and a
    greedy row consuming its generator (its later sampled tokens would shift)."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 7.0, 1.0, 7.0]])
    rows = [
        _row(SamplingParams(temperature=0.0)),
        _row(SamplingParams(top_k=1)),
        _row(SamplingParams(temperature=0.0)),
    ]
    states = [row.generator.get_state() for row in rows]
    assert sample(logits, rows).token_ids == [1, 0, 1]
    assert all(torch.equal(row.generator.get_state(), s) for row, s in zip(rows, states, strict=True))


def test_temperature_scales_logits() -> None:
    """Catches temperature multiplied instead of divided, or applied after the masks."""
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    probs = processed_probs(logits, _row(SamplingParams(temperature=0.5)))
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, dim=0), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("top_k", "logits", "kept"),
    [
        (2, [1.0, 5.0, 3.0, 4.0, 2.0, 0.0], {1, 3}),
        (3, [1.0, 5.0, 3.0, 4.0, 2.0, 0.0], {1, 2, 3}),
        (2, [1.0, 5.0, 3.0, 3.0, 2.0], {1, 2, 3}),  # ties with the k-th are kept
        (6, [1.0, 5.0, 3.0, 4.0, 2.0, 0.0], {0, 1, 2, 3, 4, 5}),
        (60, [1.0, 5.0, 3.0], {0, 1, 2}),  # larger than the vocabulary: off
    ],
)
def test_top_k_mask_is_exact(top_k: int, logits: list[float], kept: set[int]) -> None:
    """Catches an off-by-one k, ties at the k-th value dropped, or a k above V crashing topk."""
    logits_t = torch.tensor(logits)
    probs = processed_probs(logits_t, _row(SamplingParams(top_k=top_k)))
    assert _kept(probs) == kept
    index = torch.tensor(sorted(kept))
    torch.testing.assert_close(probs[index], torch.softmax(logits_t[index], dim=0), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("top_p", "kept", "expected"),
    [
        (0.4, {0}, [1.0, 0, 0, 0, 0]),
        (0.6, {0, 1}, [2 / 3, 1 / 3, 0, 0, 0]),
        (0.8, {0, 1, 2}, [4 / 7, 2 / 7, 1 / 7, 0, 0]),
        (0.9, {0, 1, 2, 3, 4}, [0.5, 0.25, 0.125, 0.0625, 0.0625]),  # the tie at the boundary stays
    ],
)
def test_top_p_keeps_the_nucleus(top_p: float, kept: set[int], expected: list[float]) -> None:
    """Catches a nucleus one token short (mass below top_p) or long, the best token dropped for a small
    top_p, or tied tokens split by sort order."""
    probs = processed_probs(HALVING_LOGITS, _row(SamplingParams(top_p=top_p)))
    assert _kept(probs) == kept
    torch.testing.assert_close(probs, torch.tensor(expected), rtol=0, atol=1e-7)


def _reference_nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    probs = torch.softmax(logits, dim=0).double()
    sorted_probs = probs.sort(descending=True).values
    needed = int((sorted_probs.cumsum(0) < top_p).sum())
    return set((probs >= sorted_probs[needed]).nonzero().flatten().tolist())


def test_top_p_full_sort_fallback_matches_reference() -> None:
    """Catches the topk shortcut used on a row whose nucleus is wider than the shortcut (tokens lost),
    and a row's nucleus changing with the other rows in its batch."""
    vocab = 1000
    flat = -torch.arange(vocab, dtype=torch.float32) * 0.004  # top 256 hold ~0.6 of the mass
    peaked = -torch.arange(vocab, dtype=torch.float32) * 0.5
    logits = torch.stack([flat, peaked])
    rows = [_row(SamplingParams(top_p=0.9)), _row(SamplingParams(top_p=0.9))]
    batched = processed_probs_batch(logits, rows, [[], []])
    for i in range(2):
        assert _kept(batched[i]) == _reference_nucleus(logits[i], 0.9)
        assert torch.equal(batched[i], processed_probs(logits[i], rows[i]))
    assert len(_kept(batched[0])) > 256


@pytest.mark.parametrize(
    ("min_p", "kept"), [(0.3, {0, 1}), (0.2, {0, 1, 2}), (0.1, {0, 1, 2, 3, 4}), (1.0, {0})]
)
def test_min_p_mask_is_exact(min_p: float, kept: set[int]) -> None:
    """Catches min_p compared against an absolute probability instead of min_p times the top one."""
    assert _kept(processed_probs(HALVING_LOGITS, _row(SamplingParams(min_p=min_p)))) == kept


def test_masks_apply_in_order_temperature_top_k_top_p_min_p() -> None:
    """Catches top_p computed on the distribution before top_k renormalised it (it would keep 2)."""
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # After top_k=2 the distribution is [4/7, 3/7]; 4/7 >= 0.5 so top_p keeps token 0 alone.
    assert _kept(processed_probs(logits, _row(SamplingParams(top_k=2, top_p=0.5)))) == {0}
    # Temperature 0.5 squares then renormalises: [16, 9, 4, 1] / 30, so top_p 0.75 needs two tokens
    # (three on the untempered [0.4, 0.3, 0.2, 0.1]).
    probs = processed_probs(logits, _row(SamplingParams(temperature=0.5, top_p=0.75)))
    assert _kept(probs) == {0, 1}
    # min_p after top_k: the threshold comes from the kept tokens' top probability.
    assert _kept(processed_probs(logits, _row(SamplingParams(top_k=3, min_p=0.6)))) == {0, 1}


def test_greedy_processed_probs_is_one_hot_on_penalised_argmax() -> None:
    """Catches speculative decoding verifying a greedy row against the unpenalised argmax."""
    logits = torch.tensor([3.0, 2.0, 1.0])
    row = _row(SamplingParams(temperature=0.0, presence_penalty=2.0), output=[0])
    assert processed_probs(logits, row).tolist() == [0.0, 1.0, 0.0]
    # With a draft 1 in the history: [1, 0, 1], a tie resolved to the lowest id.
    assert processed_probs(logits, row, [1]).tolist() == [1.0, 0.0, 0.0]


def test_sample_draws_from_processed_probs_with_v_uniforms() -> None:
    """Catches `sample` and `processed_probs` disagreeing (speculative decoding would then verify
    against a different distribution) and a draw count that depends on params (streams misalign)."""
    vocab = 300
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)) * 2
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.3),
        SamplingParams(temperature=1.3, top_k=7, presence_penalty=0.5, frequency_penalty=0.5, min_tokens=3),
        SamplingParams(min_p=0.05, stop_token_ids=(4,)),
    ]
    rows = [_row(p, prompt=[1, 2, 9], output=[9, 5], eos=[0], seed=40 + i) for i, p in enumerate(params)]
    expected = []
    for i, row in enumerate(rows):
        reference = make_generator(40 + i)
        probs = processed_probs(logits[i], row).unsqueeze(0)
        expected.append(int(exponential_race(probs, [reference])[0]))
    assert sample(logits, rows).token_ids == expected
    for i, row in enumerate(rows):
        reference = make_generator(40 + i)
        torch.empty(vocab, dtype=torch.float64).uniform_(generator=reference)
        assert torch.equal(row.generator.get_state(), reference.get_state())


def _random_params(generator: torch.Generator) -> SamplingParams:
    choice = int(torch.randint(0, 5, (1,), generator=generator))
    temperature = float(torch.empty(1).uniform_(0.3, 1.5, generator=generator))
    return [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=temperature),
        SamplingParams(temperature=temperature, top_p=0.8, frequency_penalty=0.3),
        SamplingParams(temperature=temperature, top_k=20, repetition_penalty=1.2, logprobs=2),
        SamplingParams(temperature=temperature, min_p=0.1, presence_penalty=-0.5, seed=7),
    ][choice]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(seed=1234),
        SamplingParams(seed=1234, temperature=0.8, top_p=0.9, repetition_penalty=1.1),
        SamplingParams(seed=1234, temperature=1.2, top_k=30, min_p=0.02, frequency_penalty=0.4, min_tokens=4),
    ],
)
def test_seeded_request_gives_the_same_tokens_alone_and_in_a_batch(params: SamplingParams) -> None:
    """Catches a shared generator, masks applied to the whole batch (top_p=1 rows losing tail tokens by
    rounding), or draws whose count depends on the batch: the same request must not change tokens when
    other random requests join it."""
    vocab, num_steps, num_rows = 300, 12, 8
    step_logits = torch.randn(num_steps, vocab, generator=torch.Generator().manual_seed(5)) * 2

    def run(position: int | None) -> list[int]:
        noise = torch.Generator().manual_seed(99 if position is None else position)
        subject = RowState.create(params, [3, 4, 5], eos_token_ids=(0,))
        others = [
            RowState.create(_random_params(noise), [1, 2], eos_token_ids=(0,), device="cpu")
            for _ in range(num_rows - 1)
        ]
        rows = [subject] if position is None else [*others[:position], subject, *others[position:]]
        for step in range(num_steps):
            logits = torch.randn(len(rows), vocab, generator=noise) * 2
            logits[rows.index(subject)] = step_logits[step]
            out = sample(logits, rows)
            for row, token in zip(rows, out.token_ids, strict=True):
                row.output_token_ids.append(token)
        return subject.output_token_ids

    alone = run(None)
    assert run(0) == alone
    assert run(5) == alone
    assert len(set(alone)) > 3  # really sampling, not stuck on one token


def test_seeds_reproduce_and_unseeded_requests_differ() -> None:
    """Catches a seed ignored (no reproducibility) and unseeded requests sharing one fixed seed."""
    logits = torch.zeros(1, 1000)

    def tokens(row: RowState) -> list[int]:
        return [sample(logits, [row]).token_ids[0] for _ in range(8)]

    assert tokens(RowState.create(SamplingParams(seed=3), [])) == tokens(
        RowState.create(SamplingParams(seed=3), [])
    )
    assert tokens(RowState.create(SamplingParams(seed=3), [])) != tokens(
        RowState.create(SamplingParams(seed=4), [])
    )
    assert tokens(RowState.create(SamplingParams(), [])) != tokens(RowState.create(SamplingParams(), []))


def test_sampled_tokens_follow_the_processed_distribution() -> None:
    """Catches a biased race (e.g. probs * q instead of probs / q, or log-space mixups) with a
    chi-square test of 4800 draws against the processed distribution."""
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7])
    params = SamplingParams(temperature=1.3, top_k=6)
    rows = [_row(params, seed=1000 + i) for i in range(64)]
    target = processed_probs(logits, rows[0]).double()
    counts = torch.zeros(8, dtype=torch.float64)
    for _ in range(75):
        for token in sample(logits.expand(64, 8), rows).token_ids:
            counts[token] += 1
    assert counts[target == 0].sum() == 0, "a masked token was sampled"
    expected = target[target > 0] * counts.sum()
    chi_square = float(((counts[target > 0] - expected) ** 2 / expected).sum())
    assert chi_square < _chi_square_bound(len(expected) - 1)


def test_logprobs_are_raw_log_softmax() -> None:
    """Catches logprobs reported after penalties/temperature (vLLM's default is the raw model's), a
    wrong chosen-token logprob, top-N not sorted, or rows without logprobs getting some."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0], [0.0, 4.0, 1.0, 1.0, 2.0], [1.0, 1.0, 5.0, 0.0, 0.0]])
    rows = [
        _row(SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=3), output=[3]),
        _row(SamplingParams(temperature=0.5, logprobs=0)),
        _row(SamplingParams(temperature=0.0)),
    ]
    out = sample(logits, rows)
    assert out.token_ids[0] == 0  # the penalty moved the argmax from 3 to 0
    raw = torch.log_softmax(logits, dim=1)
    assert out.logprobs[0] == pytest.approx(float(raw[0, 0]), abs=1e-6)
    assert out.logprobs[1] == pytest.approx(float(raw[1, out.token_ids[1]]), abs=1e-6)
    assert out.logprobs[2] is None and out.top_logprobs[2] is None
    top = out.top_logprobs[0]
    assert top is not None and [t for t, _ in top] == [3, 0, 1]
    assert [v for _, v in top] == pytest.approx(raw[0, [3, 0, 1]].tolist(), abs=1e-6)
    assert out.top_logprobs[1] == []


def test_sample_leaves_logits_untouched() -> None:
    """Catches in-place penalties, temperature or masks on the caller's logits (the runner may reuse
    them, e.g. for logprobs or MTP)."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    rows = [
        _row(
            SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.5), prompt=[1]
        ),
        _row(SamplingParams(temperature=0.0, frequency_penalty=1.0), output=[2]),
        _row(SamplingParams()),
    ]
    sample(logits, rows)
    sample(logits[2:], rows[2:])
    assert torch.equal(logits, before)
