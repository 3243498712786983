"""Per-request sampling knobs (the OpenAI / vLLM set) and their validation.

The gateway builds one frozen `SamplingParams` per request and calls `validate(vocab_size)` before
the request reaches a replica, so a bad value fails that request with the offending field's name
(`InvalidSamplingParameter.field`, for OpenAI's `param`) instead of failing a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

MAX_TEMPERATURE = 100.0
MAX_PENALTY = 2.0  # OpenAI's bound on presence/frequency penalties
MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs
MAX_STOP_STRINGS = 16
# torch.Generator.manual_seed accepts exactly this range.
MIN_SEED = -(1 << 63)
MAX_SEED = (1 << 64) - 1


class InvalidSamplingParameter(ValueError):
    """A sampling parameter out of range; `field` names it so the API can report OpenAI's `param`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off; a value >= the vocabulary size is also off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; applies to prompt and output tokens (as vLLM)
    presence_penalty: float = 0.0  # applies to output tokens only
    frequency_penalty: float = 0.0  # applies to output tokens only
    seed: int | None = None  # None = a fresh random seed per request
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives to report per token; None = no logprobs at all
    min_tokens: int = 0  # stop strings, stop ids and EOS are masked until this many tokens exist

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int) -> None:
        """Raises `InvalidSamplingParameter` for the first bad field (ranges written to reject NaN)."""
        if self.max_tokens < 1:
            _fail("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            _fail("temperature", f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            _fail("top_k", f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            _fail("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0 or self.repetition_penalty == float("inf"):
            _fail(
                "repetition_penalty",
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                _fail(name, f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            _fail("seed", f"seed must be in [{MIN_SEED}, {MAX_SEED}], got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            _fail("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        if any(len(s) == 0 for s in self.stop):
            _fail("stop", "stop strings must be non-empty")
        bad_ids = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad_ids:
            _fail("stop_token_ids", f"stop_token_ids must be in [0, {vocab_size}), got {bad_ids[:5]}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            _fail("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            _fail(
                "min_tokens",
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
            )


def _fail(field: str, message: str) -> NoReturn:
    raise InvalidSamplingParameter(field, message)
