"""OpenAI request fields -> the engine's `SamplingParams`, and the prompt-length checks, with the
OpenAI parameter named in every refusal."""

from __future__ import annotations

from gateway.errors import APIError
from gateway.schemas import _Sampling
from protocol.sampling import SamplingParams


def check_prompt(num_prompt: int, max_model_len: int, max_prompt_tokens: int | None, param: str) -> None:
    if num_prompt == 0:
        raise APIError(400, f"{param} is empty", param)
    limit = min(max_model_len - 1, max_prompt_tokens or max_model_len)
    if num_prompt > limit:
        raise APIError(
            400,
            f"{param} has {num_prompt} tokens; this model accepts at most {limit} prompt tokens "
            f"(context {max_model_len})",
            param,
            "context_length_exceeded",
        )


def engine_params(
    request: _Sampling,
    max_tokens: int | None,
    num_prompt: int,
    max_model_len: int,
    num_logprobs: int | None,
    choice: int,
) -> SamplingParams:
    room = max_model_len - num_prompt
    if max_tokens is not None and max_tokens > room:
        raise APIError(
            400,
            f"max_tokens {max_tokens} + {num_prompt} prompt tokens exceed the context of {max_model_len} tokens",
            "max_tokens",
            "context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else room,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=max(0, request.top_k),  # OpenAI-style -1 = off
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        # n choices from one seed must differ, and stay reproducible
        seed=None if request.seed is None else (request.seed + choice) % 2**63,
        stop=request.stop_list(),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        logprobs=num_logprobs,
        min_tokens=request.min_tokens,
    )
