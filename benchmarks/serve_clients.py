"""The client side of benchmarks/serve_vs_peers.py: streaming `/v1/completions` requests over raw
httpx2 (SSE lines parsed with json, no SDK models: the least client CPU on a host the servers
share), closed-loop clients at a fixed concurrency, and the per-level summary.

ITL here is per token: a request's decode time (first to last text chunk) over its output tokens
after the first (usage.completion_tokens - 1), so servers that batch several tokens into one SSE
chunk (ours: engine.stream_interval_ms) compare fairly with one-token chunks; the raw gaps between
text chunks are summarised apart (`chunk_gap_ms`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

PROMPTS = Path(__file__).resolve().parent / "prompts" / "held_out.jsonl"


def load_prompts(path: Path = PROMPTS) -> list[str]:
    """The held-out prompt texts, the kinds interleaved (prose, chat, code, prose, ...)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_kind: dict[str, list[str]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row["text"])
    return interleave(list(by_kind.values()))


def interleave(groups: list[list[str]]) -> list[str]:
    """One of each kind in turn, so every level's requests mix prose, chat and code."""
    return [g[i] for i in range(max(len(g) for g in groups)) for g in groups if i < len(g)]


@dataclass
class RequestRecord:
    prompt_index: int
    ttft_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    num_chunks: int = 0  # SSE chunks that carried text
    itl_s: float | None = None  # decode time / (output_tokens - 1)
    chunk_gaps_s: list[float] = field(default_factory=list)
    error: str | None = None


async def stream_completion(
    client: httpx2.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, index: int
) -> RequestRecord:
    """One greedy streaming completion, EOS ignored, usage asked for in the last chunk."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
        "ignore_eos": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    record = RequestRecord(index)
    chunk_times: list[float] = []
    start = time.perf_counter()
    try:
        async with client.stream("POST", url + "/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                event: dict[str, Any] = json.loads(payload)
                if "error" in event:
                    record.error = f"stream error: {json.dumps(event['error'])[:200]}"
                    return record
                if any(c.get("text") for c in event.get("choices") or []):
                    chunk_times.append(time.perf_counter())
                if event.get("usage"):
                    usage = event["usage"]
                    record.output_tokens = int(usage["completion_tokens"])
                    record.prompt_tokens = int(usage["prompt_tokens"])
                    details = usage.get("prompt_tokens_details") or {}
                    record.cached_tokens = int(details.get("cached_tokens") or 0)
    except (httpx2.HTTPError, json.JSONDecodeError, KeyError) as e:
        record.error = f"{type(e).__name__}: {str(e)[:200]}"
        return record
    record.latency_s = time.perf_counter() - start
    if not chunk_times or record.output_tokens == 0:
        record.error = f"no text or no usage: {len(chunk_times)} chunks, {record.output_tokens} tokens"
        return record
    record.ttft_s = chunk_times[0] - start
    record.num_chunks = len(chunk_times)
    record.chunk_gaps_s = [b - a for a, b in itertools.pairwise(chunk_times)]
    if record.output_tokens > 1:
        record.itl_s = (chunk_times[-1] - chunk_times[0]) / (record.output_tokens - 1)
    return record


async def run_clients(
    url: str, model: str, prompts: list[str], offset: int, num_requests: int, concurrency: int,
    max_tokens: int,
) -> tuple[list[RequestRecord], float]:  # fmt: skip
    """`concurrency` closed-loop clients send `num_requests` in all: each takes the next held-out
    prompt in turn (from `offset`) as soon as its previous request ended. Returns the records and
    the wall time from the first send to the last end."""
    next_request = iter(range(num_requests))
    records: list[RequestRecord] = []
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(600.0), limits=limits) as client:

        async def client_loop() -> None:
            for n in next_request:
                index = (offset + n) % len(prompts)
                records.append(await stream_completion(client, url, model, prompts[index], max_tokens, index))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
    return records, wall_s


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def summarize(records: list[RequestRecord], wall_s: float, client_cpu_s: float) -> dict[str, Any]:
    """One level of one run: output tok/s over the level's wall time, TTFT/ITL/chunk-gap p50 and
    p99 over its successful requests, failures with their first errors."""
    ok = [r for r in records if r.error is None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [r.itl_s for r in ok if r.itl_s is not None]
    gaps = [g for r in ok for g in r.chunk_gaps_s]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "wall_s": round(wall_s, 3),
        "output_tokens": output_tokens,
        "output_tok_s": round(output_tokens / wall_s, 1) if wall_s > 0 else None,
        "ttft_ms_p50": _ms(percentile(ttfts, 50)),
        "ttft_ms_p99": _ms(percentile(ttfts, 99)),
        "itl_ms_p50": _ms(percentile(itls, 50)),
        "itl_ms_p99": _ms(percentile(itls, 99)),
        "chunk_gap_ms_p50": _ms(percentile(gaps, 50)),
        "chunk_gap_ms_p99": _ms(percentile(gaps, 99)),
        "tokens_per_chunk": round(output_tokens / max(1, sum(r.num_chunks for r in ok)), 2),
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "client_cpu_s": round(client_cpu_s, 3),
    }
