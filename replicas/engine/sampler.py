"""Batched sampling from fp32 logits: penalties, min_tokens, temperature, top-k, top-p, min-p, draw.

Every request owns a `RowState` (params, token history, its own torch.Generator). A sampled row draws
exactly V uniforms from its own generator per token and takes argmax(probs / E), E = -log U ~ Exp(1)
(the exponential race, equivalent to sampling from probs), so its tokens depend only on its own
logits, params, history and seed, never on the other rows of the batch; greedy rows draw nothing.
Reported logprobs are the raw model's (log-softmax before penalties and temperature), as vLLM's default
`raw_logprobs`. `processed_probs` exposes the exact distribution drawn from, for speculative decoding.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from protocol.sampling import SamplingParams

# top_p first tries the nucleus within this many top tokens (a topk) before a full sort of the row.
_TOP_P_FIRST_K = 256


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """One generator per request, on the logits' device; an unseeded request gets a fresh random seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(64))
    return generator


@dataclass(eq=False)
class RowState:
    """One request's sampling state, kept by the engine for the request's life.

    Build it with `create` (a generator on the logits' device, seeded from params.seed). The engine
    appends each emitted token to `output_token_ids` (append-only: tokens once emitted are never
    rewritten); penalty tensors are cached here and updated incrementally from that list, so a long
    prompt costs O(V) per step, not O(prompt).
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int]
    generator: torch.Generator
    eos_token_ids: tuple[int, ...] = ()
    is_greedy: bool = field(init=False)
    has_penalties: bool = field(init=False)
    min_tokens_ids: tuple[int, ...] = field(init=False)  # masked while the output is under min_tokens
    _prompt_mask: Tensor | None = field(default=None, init=False, repr=False)  # [V] bool
    _output_counts: Tensor | None = field(default=None, init=False, repr=False)  # [V] fp32
    _num_counted: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.is_greedy = self.params.is_greedy
        self.has_penalties = self.params.has_penalties
        eos = () if self.params.ignore_eos else self.eos_token_ids
        ids = tuple(sorted(set(self.params.stop_token_ids) | set(eos)))
        self.min_tokens_ids = ids if self.params.min_tokens > 0 else ()

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        eos_token_ids: tuple[int, ...] = (),
        device: torch.device | str = "cpu",
    ) -> RowState:
        return cls(params, prompt_token_ids, [], make_generator(params.seed, device), eos_token_ids)

    def prompt_mask(self, vocab_size: int, device: torch.device) -> Tensor:
        if self._prompt_mask is None:
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # [V]
            if len(self.prompt_token_ids) > 0:
                mask[torch.tensor(list(self.prompt_token_ids), device=device)] = True
            self._prompt_mask = mask
        return self._prompt_mask

    def output_counts(self, vocab_size: int, device: torch.device) -> Tensor:
        num_tokens = len(self.output_token_ids)
        if self._output_counts is None or num_tokens < self._num_counted:
            self._output_counts = torch.zeros(vocab_size, device=device)  # [V]
            self._num_counted = 0
        if num_tokens > self._num_counted:
            _add_counts(self._output_counts, self.output_token_ids[self._num_counted :])
            self._num_counted = num_tokens
        return self._output_counts


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # raw logprob of the chosen token; None where the row asked for none
    top_logprobs: list[list[tuple[int, float]] | None]  # (token id, raw logprob), best first


def sample(logits: Tensor, rows: Sequence[RowState]) -> SampleOutput:
    """Samples one token per row from `logits` [B, V] fp32; does not modify `logits`."""
    num_rows = logits.shape[0]
    assert logits.dim() == 2 and num_rows == len(rows), (tuple(logits.shape), len(rows))
    work = penalised_logits(logits, rows, None)  # [B, V]
    sampled = [i for i, row in enumerate(rows) if not row.is_greedy]
    if not sampled:  # fast path: one argmax (first maximum wins ties, so the lowest id)
        tokens = _argmax(work)
    elif len(sampled) == num_rows:
        tokens = exponential_race(
            _sampling_probs(work, rows, work is not logits), [r.generator for r in rows]
        )
    else:
        index = torch.tensor(sampled, device=logits.device)
        sampled_rows = [rows[i] for i in sampled]
        probs = _sampling_probs(work.index_select(0, index), sampled_rows, True)  # [S, V]
        tokens = _argmax(work)
        tokens.index_copy_(0, index, exponential_race(probs, [r.generator for r in sampled_rows]))
    token_ids: list[int] = tokens.tolist()
    logprobs: list[float | None] = [None] * num_rows
    top_logprobs: list[list[tuple[int, float]] | None] = [None] * num_rows
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if wanted:
        _fill_logprobs(logits, tokens, rows, wanted, logprobs, top_logprobs)
    return SampleOutput(token_ids, logprobs, top_logprobs)


def processed_probs(logits: Tensor, row: RowState, extra_history: Sequence[int] = ()) -> Tensor:
    """The distribution [V] `sample` would draw from for `logits` [V], with `extra_history` appended to
    the row's output (for penalties and min_tokens); one-hot on the argmax for a greedy row."""
    return processed_probs_batch(logits.unsqueeze(0), [row], [extra_history])[0]


def processed_probs_batch(
    logits: Tensor, rows: Sequence[RowState], extra_histories: Sequence[Sequence[int]]
) -> Tensor:
    """`processed_probs` for N rows at once: logits [N, V] -> probs [N, V] (rows may repeat)."""
    assert logits.dim() == 2 and logits.shape[0] == len(rows) == len(extra_histories)
    work = penalised_logits(logits, rows, extra_histories)  # [N, V]
    probs = torch.zeros_like(work)
    probs.scatter_(1, _argmax(work).unsqueeze(1), 1.0)  # greedy rows: point mass on the argmax
    sampled = [i for i, row in enumerate(rows) if not row.is_greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        sub = _sampling_probs(work.index_select(0, index), [rows[i] for i in sampled], True)
        probs.index_copy_(0, index, sub)
    return probs


def exponential_race(probs: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """Samples one id per row of `probs` [S, V] as argmax(probs / E), E = -log(U) ~ Exp(1), drawing
    exactly V uniforms per row from that row's generator. Consumes `probs`: it is divided in place."""
    uniform = torch.empty(probs.shape, dtype=torch.float64, device=probs.device)  # [S, V]
    if len(generators) == 1:
        uniform.uniform_(generator=generators[0])
    else:
        for j, generator in enumerate(generators):
            uniform[j].uniform_(generator=generator)
    # U in float64 resolves the tiny E where unlikely tokens win (a float32 U would quantise them; E
    # itself fits float32 finely) and is 3x cheaper than exponential_ on CPU; U = 0 gives a ratio of 0,
    # never NaN. argmax(p / -log U) is argmin(p / log U), saving the negation; the first minimum wins
    # ties, as in `_argmax`.
    return probs.div_(uniform.log_().to(probs.dtype)).min(dim=1).indices


def _argmax(values: Tensor) -> Tensor:
    """Row-wise argmax [R, V] -> [R]; the first maximum wins ties, so the lowest id. `max` returns the
    same index as `argmax` and is several times faster on CPU."""
    return values.max(dim=1).indices


def _add_counts(counts: Tensor, token_ids: Sequence[int]) -> None:
    index = torch.tensor(list(token_ids), device=counts.device)
    counts.index_add_(0, index, torch.ones(len(index), device=counts.device))


def penalised_logits(
    logits: Tensor, rows: Sequence[RowState], extras: Sequence[Sequence[int]] | None = None
) -> Tensor:
    """Logits [B, V] after penalties and the min_tokens mask (what greedy rows take the argmax of), with
    `extras[i]` appended to row i's output; `logits` itself, unmodified, when no row needs either."""
    penalised = [i for i, row in enumerate(rows) if row.has_penalties]
    masked = [
        i
        for i, row in enumerate(rows)
        if row.min_tokens_ids
        and len(row.output_token_ids) + (len(extras[i]) if extras else 0) < row.params.min_tokens
    ]
    if not penalised and not masked:
        return logits
    work = logits.clone()  # [B, V]
    if penalised:
        _apply_penalties(work, penalised, rows, extras)
    for i in masked:
        work[i, list(rows[i].min_tokens_ids)] = float("-inf")
    return work


def _apply_penalties(
    work: Tensor, index_list: list[int], rows: Sequence[RowState], extras: Sequence[Sequence[int]] | None
) -> None:
    """vLLM's penalties, in its order: repetition (prompt + output), then frequency, then presence."""
    vocab_size, device = work.shape[1], work.device
    counts_list = []
    for i in index_list:
        counts = rows[i].output_counts(vocab_size, device)
        if extras and extras[i]:
            counts = counts.clone()
            _add_counts(counts, extras[i])
        counts_list.append(counts)
    counts = torch.stack(counts_list)  # [P, V]
    in_output = counts > 0  # [P, V]
    params = [rows[i].params for i in index_list]
    index = torch.tensor(index_list, device=device)
    sub = work.index_select(0, index)  # [P, V]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = torch.stack([rows[i].prompt_mask(vocab_size, device) for i in index_list]) | in_output
        penalty = _column([p.repetition_penalty for p in params], work)  # [P, 1]
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if any(p.frequency_penalty != 0.0 for p in params):
        sub = sub - _column([p.frequency_penalty for p in params], work) * counts
    if any(p.presence_penalty != 0.0 for p in params):
        sub = sub - _column([p.presence_penalty for p in params], work) * in_output
    work.index_copy_(0, index, sub)


def _sampling_probs(work: Tensor, rows: Sequence[RowState], owned: bool) -> Tensor:
    """Temperature, top-k, top-p, min-p, then softmax: penalised logits [S, V] -> probs [S, V].

    Each mask runs only on the rows that set it (a top_p of 1.0 through the cumsum could drop tail
    tokens by rounding); `owned` says whether `work` may be modified in place.
    """
    temperatures = [row.params.temperature for row in rows]
    if any(t != 1.0 for t in temperatures):
        work = work / _column(temperatures, work)
        owned = True
    vocab_size = work.shape[1]
    top_k = [i for i, row in enumerate(rows) if 0 < row.params.top_k < vocab_size]
    top_p = [i for i, row in enumerate(rows) if row.params.top_p < 1.0]
    min_p = [i for i, row in enumerate(rows) if row.params.min_p > 0.0]
    if (top_k or top_p or min_p) and not owned:
        work = work.clone()
    if top_k:
        _masked(work, top_k, _top_k_mask, [rows[i].params.top_k for i in top_k])
    if top_p:
        _masked(work, top_p, _top_p_mask, [rows[i].params.top_p for i in top_p])
    if min_p:
        _masked(work, min_p, _min_p_mask, [rows[i].params.min_p for i in min_p])
    return torch.softmax(work, dim=1)


def _masked(
    work: Tensor,
    index_list: list[int],
    make_mask: Callable[[Tensor, Sequence[float]], Tensor],
    values: Sequence[float],
) -> None:
    """Sets to -inf, in the rows `index_list` of `work` [S, V], what `make_mask` marks given each
    row's parameter value."""
    if len(index_list) == work.shape[0]:
        work.masked_fill_(make_mask(work, values), float("-inf"))
        return
    index = torch.tensor(index_list, device=work.device)
    sub = work.index_select(0, index)  # [R, V]
    work.index_copy_(0, index, sub.masked_fill_(make_mask(sub, values), float("-inf")))


def _top_k_mask(logits: Tensor, top_k: Sequence[float]) -> Tensor:
    """Drops logits below each row's k-th largest; ties with the k-th are kept."""
    ks = [int(k) for k in top_k]
    top = torch.topk(logits, max(ks), dim=1).values  # [R, max_k], descending
    kth = top.gather(1, torch.tensor(ks, device=logits.device).sub_(1).unsqueeze(1))  # [R, 1]
    return logits < kth


def _top_p_mask(logits: Tensor, top_p: Sequence[float]) -> Tensor:
    """Keeps the nucleus: the most likely tokens, in order, until their mass reaches top_p, plus every
    token tied with the last one needed (so ties never depend on sort order).

    Most rows reach top_p within their top few hundred tokens, so a cheap topk is tried first and only
    the rows it does not cover pay for a full sort; the choice depends on the row alone.
    """
    probs = torch.softmax(logits, dim=1)  # [R, V]
    mass = _column(top_p, probs)  # [R, 1]
    top = torch.topk(probs, min(_TOP_P_FIRST_K, probs.shape[1]), dim=1).values  # [R, k], descending
    cumulative = top.cumsum(dim=1)  # [R, k]
    floor = _nucleus_floor(top, cumulative, mass)  # [R, 1]
    short = (cumulative[:, -1] < mass[:, 0]).nonzero().squeeze(1)  # rows the top k does not cover
    if short.numel() > 0:
        full = probs.index_select(0, short).sort(dim=1, descending=True).values  # [R', V]
        floor.index_copy_(0, short, _nucleus_floor(full, full.cumsum(dim=1), mass.index_select(0, short)))
    return probs < floor


def _nucleus_floor(sorted_probs: Tensor, cumulative: Tensor, mass: Tensor) -> Tensor:
    """The probability [R, 1] of the last token the nucleus needs: the first whose cumulative mass
    reaches `mass` (the last token if rounding keeps the total below it)."""
    needed = (cumulative < mass).sum(dim=1, keepdim=True).clamp_(max=sorted_probs.shape[1] - 1)
    return sorted_probs.gather(1, needed)


def _min_p_mask(logits: Tensor, min_p: Sequence[float]) -> Tensor:
    """Drops tokens whose probability is below min_p times the row's top probability."""
    probs = torch.softmax(logits, dim=1)  # [R, V]
    return probs < probs.amax(dim=1, keepdim=True) * _column(min_p, logits)


def _fill_logprobs(
    logits: Tensor,
    tokens: Tensor,
    rows: Sequence[RowState],
    wanted: list[int],
    logprobs: list[float | None],
    top_logprobs: list[list[tuple[int, float]] | None],
) -> None:
    """Raw logprobs (before penalties and temperature) of the chosen and the top-N tokens."""
    if len(wanted) == len(rows):
        raw, chosen = logits, tokens
    else:
        index = torch.tensor(wanted, device=logits.device)
        raw, chosen = logits.index_select(0, index), tokens.index_select(0, index)
    log_probs = torch.log_softmax(raw.float(), dim=1)  # [W, V]
    chosen_values = log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    num_top = [rows[i].params.logprobs or 0 for i in wanted]
    max_top = min(max(num_top), log_probs.shape[1])
    top_values: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if max_top > 0:
        values, ids = torch.topk(log_probs, max_top, dim=1)  # [W, max_top]
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(wanted):
        logprobs[i] = chosen_values[j]
        top_logprobs[i] = list(zip(top_ids[j][: num_top[j]], top_values[j][: num_top[j]], strict=True))


def _column(values: Sequence[float], like: Tensor) -> Tensor:
    """Per-row parameters as a [R, 1] tensor, even when all are equal: torch may divide by a Python
    scalar through its reciprocal, which would make a row's result depend on its batch-mates."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # [R, 1]
