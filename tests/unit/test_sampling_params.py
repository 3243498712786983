"""SamplingParams: defaults, greedy detection and validation naming the offending field."""

import math

import pytest

from protocol.sampling import InvalidSamplingParameter, SamplingParams

VOCAB = 100


def test_defaults_are_valid_and_match_openai() -> None:
    """Catches a default drifting from the OpenAI/vLLM ones (e.g. temperature 0 or max_tokens 64)."""
    params = SamplingParams()
    params.validate(VOCAB)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.min_p) == (
        16,
        1.0,
        1.0,
        0,
        0.0,
    )
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.0, 0.0, 0.0)
    assert params.logprobs is None and params.seed is None and params.stop == () and not params.is_greedy
    assert not params.has_penalties


@pytest.mark.parametrize(
    ("params", "greedy"),
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(top_k=1), True),
        (SamplingParams(temperature=0.5, top_k=2), False),
        (SamplingParams(temperature=1e-6), False),
    ],
)
def test_is_greedy(params: SamplingParams, greedy: bool) -> None:
    """Catches top_k=1 not being treated as greedy (it would draw random numbers for a fixed answer)."""
    assert params.is_greedy is greedy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 100.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop": tuple(f"s{i}" for i in range(17))}, "stop"),
        ({"stop_token_ids": (5, VOCAB)}, "stop_token_ids"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens"),  # above the default max_tokens of 16
        ({"seed": 1 << 64}, "seed"),
    ],
)
def test_invalid_values_name_their_field(kwargs: dict, field: str) -> None:
    """Catches a bad value accepted (it would fail a decode step for the whole batch) or reported under
    the wrong field (the OpenAI error's `param`)."""
    with pytest.raises(InvalidSamplingParameter) as info:
        SamplingParams(**kwargs).validate(VOCAB)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": 100.0},
        {"top_p": 1e-6},
        {"top_k": VOCAB * 10},  # larger than the vocabulary means off, as in vLLM
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"repetition_penalty": 1e-3},
        {"logprobs": 0},
        {"logprobs": 20},
        {"stop": tuple(f"s{i}" for i in range(16))},
        {"stop_token_ids": (0, VOCAB - 1)},
        {"min_tokens": 16},
        {"seed": -(1 << 63)},
        {"seed": (1 << 64) - 1},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    """Catches off-by-one bounds that reject values OpenAI clients legitimately send."""
    SamplingParams(**kwargs).validate(VOCAB)


def test_params_are_frozen() -> None:
    """Catches mutation after construction (params are shared between the gateway and the engine)."""
    params = SamplingParams()
    with pytest.raises(AttributeError):
        params.temperature = 0.0  # type: ignore[misc]
