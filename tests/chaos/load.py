"""Steady streaming load against the served HTTP API, recorded per request: what a chaos test
measures around a fault. Worker threads send streaming chat completions back to back (httpx, SSE
parsed by hand so a stream's error event is seen as such); a request that ends with a retriable
error (HTTP 429/503, or an SSE error event that asks for a retry) is sent again once, as a new
record marked as a retry. A request that neither finished nor errored within the client's bound
is "lost": the one outcome a chaos test must never see."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import httpx2 as httpx

Outcome = Literal["pending", "ok", "retriable", "failed", "lost"]
MODEL = "mimo-tiny"


@dataclass
class RequestRecord:
    sent_s: float  # time.monotonic() when sent
    is_retry: bool
    outcome: Outcome = "pending"
    first_token_s: float | None = None
    ended_s: float | None = None
    status: int | None = None
    retry_after_s: float | None = None  # the Retry-After header of a refusal
    detail: str = ""


@dataclass
class LoadConfig:
    base_url: str  # .../v1
    api_key: str
    concurrency: int = 4
    max_tokens: int = 32
    request_timeout_s: float = 120.0  # the liveness bound: no answer in this long is a lost request
    retry_wait_cap_s: float = 1.0  # a retry waits Retry-After, at most this long
    prompt: Callable[[int], str] = lambda i: f"Tell me a short story about fault number {i}."


@dataclass
class SteadyLoad:
    """`concurrency` threads sending requests back to back until `stop()`; `records` holds every
    attempt (appends are atomic under the GIL)."""

    config: LoadConfig
    records: list[RequestRecord] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> SteadyLoad:
        for worker in range(self.config.concurrency):
            thread = threading.Thread(target=self._run, args=(worker,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stops sending; waits for the requests in flight (each bounded by the client timeout)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.config.request_timeout_s + 30)
        for record in self.records:  # a thread still stuck past its own timeout: lost
            if record.outcome == "pending":
                record.outcome = "lost"

    def wait_for_successes(self, count: int, timeout_s: float, after_s: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(r.outcome == "ok" and r.sent_s >= after_s for r in list(self.records)) >= count:
                return True
            time.sleep(0.2)
        return False

    def _run(self, worker: int) -> None:
        c = self.config
        headers = {"Authorization": f"Bearer {c.api_key}"}
        timeout = httpx.Timeout(c.request_timeout_s, connect=10.0)
        with httpx.Client(base_url=c.base_url, headers=headers, timeout=timeout) as client:
            i, retry = 0, False
            while not self._stop.is_set():
                record = RequestRecord(time.monotonic(), retry)
                self.records.append(record)
                wait_s = send_one(client, c, record, f"{c.prompt(worker * 100_000 + i)}")
                retry = record.outcome == "retriable" and not retry  # one retry per request
                if not retry:
                    i += 1
                if wait_s:
                    time.sleep(min(wait_s, c.retry_wait_cap_s))


def send_one(client: httpx.Client, c: LoadConfig, record: RequestRecord, prompt: str) -> float:
    """Sends one streaming chat and fills `record`; returns the Retry-After to honour (0 if none)."""
    try:
        with client.stream("POST", "/chat/completions", json=chat_body(c, prompt)) as response:
            if not on_status(record, response.status_code, response.headers):
                response.read()
                end_record(record, record.outcome, response.text[:120])
                return record.retry_after_s or 0.0
            for line in response.iter_lines():
                if on_line(record, line):
                    return 0.0
            end_record(record, "failed" if record.outcome == "pending" else record.outcome, "stream cut")
    except httpx.TimeoutException as e:
        end_record(record, "lost", f"no answer within the bound: {type(e).__name__}")
    except httpx.HTTPError as e:  # the connection dropped (a proxy died): an error the client sees
        end_record(record, "retriable", f"dropped: {type(e).__name__}")
        return 1.0
    return 0.0


async def send_one_async(
    client: httpx.AsyncClient, c: LoadConfig, record: RequestRecord, prompt: str
) -> None:
    """`send_one` on an async client (the open-loop load of the overload test)."""
    try:
        async with client.stream("POST", "/chat/completions", json=chat_body(c, prompt)) as response:
            if not on_status(record, response.status_code, response.headers):
                await response.aread()
                end_record(record, record.outcome, response.text[:120])
                return
            async for line in response.aiter_lines():
                if on_line(record, line):
                    return
            end_record(record, "failed" if record.outcome == "pending" else record.outcome, "stream cut")
    except httpx.TimeoutException as e:
        end_record(record, "lost", f"no answer within the bound: {type(e).__name__}")
    except httpx.HTTPError as e:
        end_record(record, "retriable", f"dropped: {type(e).__name__}")


def chat_body(c: LoadConfig, prompt: str) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": c.max_tokens,
        "temperature": 0,
        "stream": True,
    }


def on_status(record: RequestRecord, status: int, headers: httpx.Headers) -> bool:
    """Notes the response's status; False (the request ended) unless it is a 200 stream."""
    record.status = status
    if status == 200:
        return True
    retriable = status in (429, 503)
    record.outcome = "retriable" if retriable else "failed"
    if "retry-after" in headers:
        record.retry_after_s = float(headers["retry-after"])
    return False


def on_line(record: RequestRecord, line: str) -> bool:
    """Takes one SSE line; True once the stream is done ([DONE])."""
    if not line.startswith("data: "):
        return False
    data = line.removeprefix("data: ")
    if data == "[DONE]":
        end_record(record, "ok" if record.outcome == "pending" else record.outcome)
        return True
    event = json.loads(data)
    if "error" in event:  # a stream that started and then failed
        message = str(event["error"].get("message", ""))
        end_record(record, "retriable" if "retry" in message.lower() else "failed", message[:120])
    elif record.first_token_s is None and event.get("choices"):
        record.first_token_s = time.monotonic()
    return False


async def open_loop(c: LoadConfig, rate_per_s: float, duration_s: float) -> list[RequestRecord]:
    """Requests sent at a fixed rate for `duration_s`, whatever the answers (an open loop: arrivals
    do not wait for the cluster, as under real overload); returns once every one has ended."""
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(c.request_timeout_s, connect=30.0)
    headers = {"Authorization": f"Bearer {c.api_key}"}
    async with httpx.AsyncClient(
        base_url=c.base_url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        tasks = []
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < duration_s:
            record = RequestRecord(time.monotonic(), is_retry=False)
            records.append(record)
            tasks.append(asyncio.create_task(send_one_async(client, c, record, c.prompt(i))))
            i += 1
            await asyncio.sleep(max(0.0, started + i / rate_per_s - time.monotonic()))
        await asyncio.wait(tasks, timeout=c.request_timeout_s + 30)
    for record in records:
        if record.outcome == "pending":
            record.outcome = "lost"
    return records


def end_record(record: RequestRecord, outcome: Outcome, detail: str = "") -> None:
    if record.ended_s is None:
        record.ended_s = time.monotonic()
    record.outcome = outcome
    if detail and not record.detail:
        record.detail = detail


def summarize(records: list[RequestRecord], fault_s: float | None) -> dict[str, object]:
    """The per-fault numbers of chaos.json: requests sent, completed, retried, failed retriably,
    failed otherwise, lost; the time from the fault to the first success of a request sent after it
    (recovery); and TTFT of the completed requests."""
    done = [r for r in records if r.outcome == "ok"]
    ttfts = sorted(r.first_token_s - r.sent_s for r in done if r.first_token_s is not None)
    summary: dict[str, object] = {
        "sent": len(records),
        "completed": len(done),
        "retried": sum(r.is_retry for r in records),
        "failed_retriable": sum(r.outcome == "retriable" for r in records),
        "failed_other": sum(r.outcome == "failed" for r in records),
        "lost": sum(r.outcome in ("lost", "pending") for r in records),
        "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3) if ttfts else None,
        "ttft_max_s": round(ttfts[-1], 3) if ttfts else None,
    }
    if fault_s is not None:
        after = [r.ended_s for r in done if r.sent_s >= fault_s and r.ended_s is not None]
        summary["recover_s"] = round(min(after) - fault_s, 3) if after else None
        errors = [
            r
            for r in records
            if r.outcome in ("retriable", "failed") and r.ended_s is not None and r.ended_s >= fault_s
        ]
        summary["errors_after_fault"] = len(errors)
        summary["error_details"] = sorted({r.detail for r in errors if r.detail})[:8]
    return summary
