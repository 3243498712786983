"""The OpenAI API over real HTTP (uvicorn) with the official `openai` client, on the trained tiny
model in process (the Serve cluster runs the same app: tests/integration/test_serve_app.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import torch

from cluster.cli.local_server import LocalServer
from gateway.config import GatewayConfig
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.async_engine import AsyncEngine
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from training.tool_scenarios import TOOL_SCHEMAS

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "mimo-tiny"
MODEL = "mimo-tiny"
WEATHER = [TOOL_SCHEMAS["get_weather"]]


@pytest.fixture(scope="module")
def tiny() -> tuple[object, Tokenizer]:
    torch.set_num_threads(1)
    return load_model(TINY), Tokenizer.from_dir(TINY)


def _engine(tiny: tuple[object, Tokenizer], **config: Any) -> Engine:
    model, tokenizer = tiny
    return Engine(model, tokenizer, EngineConfig(kv_cache_bytes=64 * 2**20, max_model_len=1024, **config))  # type: ignore[arg-type]


def _story(max_tokens: int, **extra: object) -> dict[str, object]:
    """A streamed chat request long enough to hold its sequence slot while a test sends another."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a story."}],
        "max_tokens": max_tokens,
        "stream": True,
        **extra,
    }


@pytest.fixture(scope="module")
def server(tiny: tuple[object, Tokenizer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    config = GatewayConfig(served_model_name=MODEL, max_model_len=1024)
    srv = LocalServer.start(AsyncEngine(_engine(tiny)), tiny[1], config)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: LocalServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def _reference(tiny: tuple[object, Tokenizer], messages: list[dict], max_tokens: int, **kw: object) -> str:
    tokenizer = tiny[1]
    ids = tokenizer.encode_chat(messages, **kw)
    out = _engine(tiny).generate(
        [GenerateRequest("r", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))]
    )
    return "".join(c.text for c in out["r"])


def test_chat_greedy_equals_the_engine(client: openai.OpenAI, tiny: tuple[object, Tokenizer]) -> None:
    """Catches the gateway changing the prompt (template, thinking flag) or the text on the way out."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    expected = _reference(tiny, messages, 24)
    assert reply.choices[0].message.content == expected.strip()
    assert reply.usage.prompt_tokens == len(tiny[1].encode_chat(messages))
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_non_streaming_and_reports_usage(client: openai.OpenAI) -> None:
    """Catches deltas that drop or duplicate text, and a missing include_usage chunk."""
    messages = [{"role": "user", "content": "Tell me about Python lists."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finishes = "", None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert text == full.choices[0].message.content
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert finishes == [full.choices[0].finish_reason]


def test_thinking_on_fills_reasoning_content_and_off_leaves_it_out(client: openai.OpenAI) -> None:
    """Catches <think> text leaking into content, or reasoning parsed when thinking is off."""
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    on = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=120,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    message = on.choices[0].message
    reasoning = getattr(message, "reasoning_content", None) or (message.model_extra or {}).get(
        "reasoning_content"
    )
    assert reasoning, "thinking on must produce reasoning_content"
    assert "<think>" not in (message.content or "") and "</think>" not in (message.content or "")
    off = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    assert not (off.choices[0].message.model_extra or {}).get("reasoning_content")


def test_tool_round_trip(client: openai.OpenAI) -> None:
    """Catches tool calls left as XML in content, untyped arguments, or tool results not rendered back."""
    messages: list[dict] = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=WEATHER, tool_choice="required", max_tokens=60, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str) and arguments["city"]
    messages.append(choice.message.model_dump(exclude_none=True))
    result = {"city": arguments["city"], "temperature": 21, "unit": "celsius", "condition": "sunny"}
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=WEATHER, max_tokens=60, temperature=0
    )
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_streamed_tool_calls_equal_the_non_streamed_ones(client: openai.OpenAI) -> None:
    """Catches incremental tool-call deltas that differ from the full parse (name, arguments, index)."""
    messages = [{"role": "user", "content": "What's the weather in Oslo in fahrenheit?"}]
    kw = dict(
        model=MODEL, messages=messages, tools=WEATHER, tool_choice="required", max_tokens=60, temperature=0
    )
    full = client.chat.completions.create(**kw)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in full.choices[0].message.tool_calls
    ]
    assert [calls[i] for i in sorted(calls)] == expected
    assert finish == "tool_calls"


def test_named_tool_choice_forces_that_tool(client: openai.OpenAI) -> None:
    """Catches tool_choice={function} being ignored."""
    tools = [TOOL_SCHEMAS["get_weather"], TOOL_SCHEMAS["get_time"]]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello there"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=40,
        temperature=0,
    )
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]


def test_n_choices_seeded_and_logprobs(client: openai.OpenAI) -> None:
    """Catches n choices sharing one seed (identical), non-reproducible seeds, or malformed logprobs."""
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=12,
        temperature=1.0,
        n=3,
        seed=7,
        logprobs=True,
        top_logprobs=2,
    )
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1
    for choice in a.choices:
        entries = choice.logprobs.content
        assert len(entries) == len(choice.logprobs.content) > 0
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_completions_text_echo_and_logprobs(client: openai.OpenAI, tiny: tuple[object, Tokenizer]) -> None:
    """Catches the legacy completions endpoint diverging from the engine or losing echo/logprobs."""
    prompt = "def fibonacci(n):"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
    ids = tiny[1].encode(prompt)
    out = _engine(tiny).generate([GenerateRequest("r", ids, SamplingParams(max_tokens=16, temperature=0.0))])
    assert reply.choices[0].text == "".join(c.text for c in out["r"])
    assert len(reply.choices[0].logprobs.tokens) == reply.usage.completion_tokens
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50},
            "top_logprobs",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
            "tool_choice",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_parameter(server: LocalServer, body: dict, param: str) -> None:
    """Catches 500s or unnamed errors for input the client got wrong."""
    r = httpx.post(f"{server.url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_json_is_400_and_openai_client_raises_bad_request(
    server: LocalServer, client: openai.OpenAI
) -> None:
    """Catches a malformed body reaching the handler (500) instead of a clean 400."""
    r = httpx.post(
        f"{server.url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["param"] == "model"


def test_body_limit_health_ready_models(server: LocalServer) -> None:
    """Catches oversized bodies being read, and the probes lying."""
    base = server.url.removesuffix("/v1")
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base}/ready").status_code == 200
    assert [m["id"] for m in httpx.get(f"{server.url}/models").json()["data"]] == [MODEL]
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}
    assert httpx.post(f"{server.url}/chat/completions", json=big, timeout=30).status_code == 413


def test_cancelled_streams_abort_their_requests_and_free_every_kv_block(
    server: LocalServer, client: openai.OpenAI
) -> None:
    """Catches closed streams whose engine requests run on to max_tokens (nobody aborts them; the
    generator is left suspended) or leak KV blocks, whether the client leaves right after the
    first event (before any token) or after a few tokens."""
    import time

    engine = server.engine
    steps_before = engine.snapshot().num_steps
    max_tokens = 900  # ignore_eos: a request that is not aborted takes >= 900 engine steps
    for num_events in (1, 4, 1, 4):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a long story."}],
            max_tokens=max_tokens,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        events = iter(stream)
        for _ in range(num_events):
            next(events)
        stream.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (engine.num_streams or engine.snapshot().num_running):
        time.sleep(0.05)
    snap = engine.snapshot()
    assert engine.num_streams == 0 and snap.num_running == 0 and snap.num_waiting == 0
    assert snap.kv_usage == {"full": 0.0, "swa": 0.0}
    assert snap.num_steps - steps_before < max_tokens  # every request was aborted, none ran out


def test_api_keys_and_rate_limits(tiny: tuple[object, Tokenizer], tmp_path: Path) -> None:
    """Catches missing auth (401), keys compared wrongly, and a rate limit without Retry-After."""
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nsk-alpha\nsk-beta\n")
    config = GatewayConfig(
        served_model_name=MODEL, max_model_len=1024, api_keys_file=str(keys), requests_per_minute=2
    )
    srv = LocalServer.start(AsyncEngine(_engine(tiny)), tiny[1], config)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        url = f"{srv.url}/chat/completions"
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer sk-gamma"}).status_code == 401
        ok = {"Authorization": "Bearer sk-alpha"}
        assert [httpx.post(url, json=body, headers=ok, timeout=30).status_code for _ in range(2)] == [
            200,
            200,
        ]
        limited = httpx.post(url, json=body, headers=ok)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        other = httpx.post(url, json=body, headers={"Authorization": "Bearer sk-beta"}, timeout=30)
        assert other.status_code == 200  # limits are per key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).models.list()
    finally:
        srv.stop()


def test_overload_is_a_fast_503_with_retry_after(tiny: tuple[object, Tokenizer]) -> None:
    """Catches overload turning into client timeouts instead of an immediate, retriable refusal,
    at the gateway (pending requests) and at the replica (streams beyond its queue)."""
    for config, max_streams in [
        (GatewayConfig(served_model_name=MODEL, max_model_len=1024, max_pending_requests=1), 1024),
        (GatewayConfig(served_model_name=MODEL, max_model_len=1024), 1),
    ]:
        srv = LocalServer.start(AsyncEngine(_engine(tiny)), tiny[1], config, max_streams=max_streams)
        try:
            body = _story(300)
            with (
                httpx.Client(timeout=60) as http,
                http.stream("POST", f"{srv.url}/chat/completions", json=body) as first,
            ):
                assert first.status_code == 200
                second = http.post(f"{srv.url}/chat/completions", json={**body, "stream": False})
                assert second.status_code == 503 and int(second.headers["retry-after"]) >= 1
        finally:
            srv.stop()


def test_a_request_queued_past_max_queue_wait_is_a_503_with_retry_after(
    tiny: tuple[object, Tokenizer],
) -> None:
    """Catches the engine's queue-time bound ending a request silently, as a 200 stream with an
    error inside, as a 500, or without Retry-After (streamed and not)."""
    engine = _engine(tiny, max_num_seqs=1, max_queue_wait_s=0.5)
    srv = LocalServer.start(
        AsyncEngine(engine), tiny[1], GatewayConfig(served_model_name=MODEL, max_model_len=1024)
    )
    try:
        body = _story(400, ignore_eos=True)
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", f"{srv.url}/chat/completions", json=body) as running,
        ):
            assert running.status_code == 200  # holds the one sequence slot
            for stream in (False, True):
                queued = http.post(f"{srv.url}/chat/completions", json={**body, "stream": stream})
                assert queued.status_code == 503 and queued.headers["retry-after"] == "2"
                error = queued.json()["error"]
                assert "max_queue_wait_s" in error["message"], error
            assert engine.stats["queue_expired"] == 2
    finally:
        srv.stop()
