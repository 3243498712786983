"""Ray Serve LLM's `PrefixCacheAffinityRouter`, fed the prompt our gateway sends, for routing.py.

Ray's router reads the prompt from a positional request object with a `.prompt` (or `.messages`)
attribute, as vLLM-style servers receive it, and ignores requests without one (plain power of two).
Our gateway calls `Attention.generate` with keyword arguments only (`prompt_token_ids`, `salt`), so
this subclass hands Ray's unchanged logic a view of each request whose one positional argument
carries `.prompt`: the salt and the token ids, one character per token. Ray's character prefix tree
then matches exactly the token prefixes the engines cache (no tokenizer or text needed in the
router); nothing else of Ray's router is changed. Pickled by value into the gateway's process by
Serve (`RequestRouterConfig`), so this module need not be importable there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RunningReplica

SURROGATES = range(0xD800, 0xE000)  # not characters: ids from here on are shifted past them


@dataclass(frozen=True)
class PromptArg:
    prompt: str  # the attribute Ray's `_extract_text_from_request` looks for


def prompt_text(token_ids: list[int] | tuple[int, ...], salt: str | None) -> str:
    """Token ids as one character each, after the tenant salt (tenants never share cached blocks)."""
    shift = len(SURROGATES)
    body = "".join(chr(t if t < SURROGATES.start else t + shift) for t in token_ids)
    return ("" if salt is None else f"{salt}\x00") + body


def with_prompt(pending_request: PendingRequest | None) -> PendingRequest | None:
    """The request as Ray's router expects it; unchanged when it has no `prompt_token_ids`."""
    if pending_request is None or pending_request.args:
        return pending_request
    token_ids = pending_request.kwargs.get("prompt_token_ids")
    if not isinstance(token_ids, list | tuple):
        return pending_request
    salt = pending_request.kwargs.get("salt")
    text = prompt_text(token_ids, salt if isinstance(salt, str) else None)
    return dataclasses.replace(pending_request, args=[PromptArg(text)])


class TokenPromptAffinityRouter(PrefixCacheAffinityRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> Any:
        return await super().choose_replicas(candidate_replicas, with_prompt(pending_request))

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        routed = with_prompt(pending_request)
        assert routed is not None
        super().on_request_routed(routed, replica_id, result)
