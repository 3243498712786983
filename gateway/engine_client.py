"""What the gateway needs from an attention replica, and the plain data that crosses the boundary.

Two implementations live in the composition root (`cluster/engine_clients.py`): a Serve handle to the
attention deployment (the cluster) and an in-process engine (single-process runs and fast tests).
Sampling parameters travel as a plain dict of `replicas.sampling_params.SamplingParams` fields, and
chunks as dicts, so this package never imports the engine.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


class EngineError(Exception):
    """A request the replica refused: `status` 400 (`param` names the field) or 429/503 (overload)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, retry_after_s: float | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "param": self.param,
            "retry_after_s": self.retry_after_s,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> EngineError:
        return EngineError(
            int(data["status"]), str(data["message"]), data.get("param"), data.get("retry_after_s")
        )


@dataclass(frozen=True)
class GenerationChunk:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0  # usage, on the last chunk
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_s: float = 0.0  # time the request waited before its first step, on the last chunk
    logprobs: list[float] = field(default_factory=list)  # one per token id, when asked
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    error: str | None = None  # the request failed inside the replica (finish_reason "error")

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "queue_s": self.queue_s,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
            "error": self.error,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> GenerationChunk:
        return GenerationChunk(
            token_ids=list(data["token_ids"]),
            text=str(data["text"]),
            finish_reason=data.get("finish_reason"),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            completion_tokens=int(data.get("completion_tokens", 0)),
            cached_tokens=int(data.get("cached_tokens", 0)),
            queue_s=float(data.get("queue_s", 0.0)),
            logprobs=list(data.get("logprobs") or []),
            top_logprobs=[[(int(t), float(p)) for t, p in row] for row in data.get("top_logprobs") or []],
            error=data.get("error"),
        )


class EngineClient(abc.ABC):
    @abc.abstractmethod
    def generate(
        self, *, prompt_token_ids: list[int], salt: str | None, params: dict[str, Any], request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        """Raises EngineError before the first chunk when the request is refused; closing the
        iterator early aborts the request and frees its KV."""

    @abc.abstractmethod
    async def is_ready(self) -> bool:
        """True when every replica and expert shard behind this client can serve."""
