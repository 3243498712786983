"""The gateway's settings, filled by the composition root from the cluster spec."""

from __future__ import annotations

from dataclasses import dataclass

from mimo.generation_config import NO_DEFAULTS, SamplingDefaults


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
    # a request's missing sampling fields take these (the checkpoint's generation_config.json)
    sampling_defaults: SamplingDefaults = NO_DEFAULTS
    default_thinking: bool = False  # chat requests that say nothing about thinking
