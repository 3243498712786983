"""A generation request and what comes back for it, as they travel between processes.

The gateway (or a replica's own API) builds one `GenerateRequest` per choice and sends it as the
one argument of the attention replica's `generate`; the router reads its `prompt_token_ids` and
`salt` from the same object. The replica streams `Chunk`s, or one `Refusal` before any chunk when it
will not run the request. The engine makes these very objects: no translation on the way out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from protocol.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str  # unique per engine request (one API choice)
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    salt: str | None = None  # prefix-cache tenant: different salts never share cached blocks
    priority: int = 0  # lower is served sooner
    # wall-clock time (time.time()) the request was built, i.e. reached the API: the engine's queue
    # time and its `max_queue_wait_s` bound count from here, through the Serve queue and the hops
    arrival_s: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_s: float = 0.0  # from arrival (GenerateRequest.arrival_s) until first scheduled


@dataclass(frozen=True)
class TokenLogprobs:
    """Raw logprob of each emitted token and its top alternatives (when the request asked)."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]  # per token: (token id, logprob), best first

    def __add__(self, later: TokenLogprobs) -> TokenLogprobs:
        return TokenLogprobs(self.logprobs + later.logprobs, self.top + later.top)


@dataclass(frozen=True)
class Chunk:
    """New output of one request: token ids, their text, and on the last chunk a finish reason
    and the usage; `error` says why a request failed inside the replica (finish reason "error"),
    and `retry_after_s` is set when that failure is transient (the request waited past the
    engine's queue bound, or the expert shards were lost): the same request may succeed if sent
    again after that long (HTTP 503 with Retry-After)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: TokenLogprobs | None = None
    error: str | None = None
    retry_after_s: float | None = None

    def followed_by(self, later: Chunk) -> Chunk:
        """This chunk and the next one of the same request as one chunk (this one not finishing)."""
        assert later.request_id == self.request_id and self.finish_reason is None
        logprobs = self.logprobs
        if later.logprobs is not None:
            logprobs = later.logprobs if logprobs is None else logprobs + later.logprobs
        return Chunk(
            self.request_id, self.token_ids + later.token_ids, self.text + later.text, later.finish_reason,
            later.usage, logprobs, later.error, later.retry_after_s,
        )  # fmt: skip


@dataclass(frozen=True)
class Refusal:
    """A request the replica will not run: 400 (`param` names the field) or 429/503 (overload,
    retry after `retry_after_s`)."""

    status: int
    message: str
    param: str | None = None
    retry_after_s: float | None = None
