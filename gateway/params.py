"""OpenAI request fields -> the engine's `SamplingParams`, and the prompt-length checks, with the
OpenAI parameter named in every refusal."""

from __future__ import annotations

from gateway.errors import APIError
from gateway.schemas import _Sampling
from mimo.generation_config import NO_DEFAULTS, SamplingDefaults
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
    defaults: SamplingDefaults = NO_DEFAULTS,
    api_max_tokens: int | None = None,
) -> SamplingParams:
    """`max_tokens`: the request's own, or None; then the checkpoint's default cap applies, else
    `api_max_tokens` (the endpoint's OpenAI default; None: up to the context). Sampling fields the
    request leaves out take the checkpoint's `defaults` where it sets them."""
    room = max_model_len - num_prompt
    if max_tokens is None:
        cap = defaults.max_tokens if defaults.max_tokens is not None else api_max_tokens
        max_tokens = room if cap is None else min(cap, room)
    elif max_tokens > room:
        raise APIError(
            400,
            f"max_tokens {max_tokens} + {num_prompt} prompt tokens exceed the context of {max_model_len} tokens",
            "max_tokens",
            "context_length_exceeded",
        )
    given = request.model_fields_set

    def pick(name: str, value: float, default: float | None) -> float:
        return value if name in given or default is None else default

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", request.temperature, defaults.temperature),
        top_p=pick("top_p", request.top_p, defaults.top_p),
        top_k=max(0, int(pick("top_k", request.top_k, defaults.top_k))),  # OpenAI-style -1 = off
        min_p=pick("min_p", request.min_p, defaults.min_p),
        repetition_penalty=pick(
            "repetition_penalty", request.repetition_penalty, defaults.repetition_penalty
        ),
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
