"""The plain generation loop: one sequence, contiguous KV cache, chunked prefill, greedy or sampled.

This is the reference the engine is checked against (a full-recompute-equivalent path with no
batching, paging or drafts) and what `mimo generate` runs on a bare checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mimo.model import KVCache, MiMoForCausalLM

PREFILL_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only
    finish_reason: str  # "stop" (a stop token) or "length"
    elapsed_s: float


def check_prompt(prompt_ids: Sequence[int], max_positions: int, vocab_size: int) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("prompt is empty: at least one token is needed")
    if len(prompt_ids) >= max_positions:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens; max_position_embeddings is {max_positions}, "
            "which must leave room for at least one generated token"
        )
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")


@torch.inference_mode()
def generate(model: MiMoForCausalLM, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
    config = model.config
    params.validate()
    check_prompt(prompt_ids, config.max_position_embeddings, config.vocab_size)
    start = time.perf_counter()
    device = next(model.parameters()).device
    cache = KVCache.empty(config)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(params.seed if params.seed is not None else 0)

    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    hidden = torch.empty(0)
    for lo in range(0, ids.shape[1], PREFILL_CHUNK_TOKENS):
        chunk = ids[:, lo : lo + PREFILL_CHUNK_TOKENS]
        positions = torch.arange(lo, lo + chunk.shape[1], device=device)
        hidden = model.forward_hidden(chunk, positions, cache)

    out: list[int] = []
    finish = "length"
    position = ids.shape[1]
    while True:
        logits = model.logits(hidden[:, -1]).float()[0]
        token = _sample(logits, params, generator)
        out.append(token)
        if token in params.stop_token_ids:
            finish = "stop"
            break
        if len(out) >= params.max_new_tokens or position + 1 >= config.max_position_embeddings:
            break
        step = torch.tensor([[token]], dtype=torch.long, device=device)
        hidden = model.forward_hidden(step, torch.tensor([position], device=device), cache)
        position += 1
    return GenerationResult(list(prompt_ids), out, finish, time.perf_counter() - start)


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1).cpu()
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
