"""The gateway's settings, filled by the composition root from the cluster spec."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    served_model_name: str
    max_model_len: int
    max_prompt_tokens: int | None = None  # None: the context minus one token
    max_body_bytes: int = 4 * 2**20
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_pending_requests: int = 512
    api_keys_file: str | None = None
