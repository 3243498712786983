"""The cluster spec's gateway section: the API's address, keys, limits and how requests reach the
attention replicas (relayed by gateway replicas, or streamed direct through HAProxy)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator

from cluster.spec_base import SpecSection


class GatewaySpec(SpecSection):
    """The OpenAI API: bind address, keys, limits."""

    host: str = Field(
        "127.0.0.1", description="HTTP bind address of the Serve proxy; off loopback needs api_keys_file"
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI API")
    num_replicas: int = Field(1, ge=1, description="gateway replicas")
    api_keys_file: str | None = Field(
        None, description="file with one API key per line (e.g. a mounted Kubernetes secret); none = no auth"
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body accepted")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt accepted; default the context"
    )
    requests_per_minute: int | None = Field(None, ge=1, description="per-key request rate limit")
    tokens_per_minute: int | None = Field(None, ge=1, description="per-key prompt+completion token limit")
    max_pending_requests: int = Field(512, ge=1, description="requests in the gateway before 503")
    max_queue_wait_s: float | None = Field(
        None,
        gt=0,
        description="longest a request may wait for its first token (router, Serve's queue, the "
        "engine's waiting queue and its prefill); past it the request is aborted and answered 503 "
        "with Retry-After; none: no bound on the first token (engine.max_queue_wait_s still bounds "
        "the wait until the request starts; the queues are bounded in counts: "
        "engine.max_queued_requests, attention.max_ongoing_requests, max_pending_requests). Prefill "
        "counts, so set it above the longest prompt's prefill; the gateway's bound, so not with "
        "direct_streaming",
    )
    default_thinking: bool = Field(
        False,
        description="reasoning for chat requests that set neither `thinking` nor "
        "chat_template_kwargs.enable_thinking",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="where Serve runs HTTP proxies (HeadOnly when nodes share one host)"
    )
    direct_streaming: bool = Field(
        False,
        description="HAProxy sends each request straight to the attention replica the router picks, "
        "which serves the API itself: one hop per streamed chunk instead of two (needs a Ray cluster "
        "started with cluster.spec.DIRECT_STREAMING_ENV; `mimo serve` and the Kubernetes render set "
        "it). Per-key rate limits are then kept in one store all replicas share.",
    )

    @model_validator(mode="after")
    def _private_unless_authenticated(self) -> GatewaySpec:
        if self.api_keys_file is None and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host} is reachable from other machines: set api_keys_file, "
                "or keep the default 127.0.0.1 (private by default)"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False
