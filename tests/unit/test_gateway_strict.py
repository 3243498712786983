"""A strict API over real HTTP (uvicorn, the tiny model in process), with API keys on: the key is
checked before the body, types are never coerced, every error names the parameter in OpenAI's
dotted form, undecodable text and over-long chunked bodies get 4xx, and nothing answers a
plain-text 5xx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch
from starlette.testclient import TestClient

from cluster.cli.local_server import LocalServer
from gateway.api import build_app
from gateway.config import GatewayConfig
from gateway.engine_client import EngineClient
from gateway.reasoning import ReasoningStream
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import Chunk, GenerateRequest
from replicas.engine.async_engine import AsyncEngine
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "mimo-tiny"
KEY = "sk-strict"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_BODY = 4096
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    torch.set_num_threads(1)
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"{KEY}\n")
    tokenizer = Tokenizer.from_dir(TINY)
    engine = Engine(
        load_model(TINY),
        tokenizer,
        EngineConfig(kv_cache_bytes=16 * 2**20, max_model_len=256, max_num_batched_tokens=256),
    )
    config = GatewayConfig("mimo-tiny", max_model_len=256, max_body_bytes=MAX_BODY, api_keys_file=str(keys))
    server = LocalServer.start(AsyncEngine(engine), tokenizer, config)
    yield server.url
    server.stop()


def _post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(
        url + path,
        content=content,
        headers={"content-type": "application/json", **AUTH, **(headers or {})},
        timeout=60,
    )


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def test_key_is_checked_before_the_body_and_401_says_bearer(url: str) -> None:
    """Catches a keyless client getting detailed 400s about its body (validation before auth), a
    401 without `WWW-Authenticate`, a rejected lower-case `bearer`, and API docs served to anyone."""
    for headers in ({"authorization": ""}, {"authorization": "Bearer wrong"}, {"authorization": "Basic x"}):
        response = _post(url, "/chat/completions", {"model": 5}, headers)
        assert _error(response, 401)["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"].startswith("Bearer")
    base = url.removesuffix("/v1")
    for path in ("/openapi.json", "/docs", "/v1/models"):
        assert httpx.get(base + path).status_code == 401
        assert httpx.get(base + path, headers={"authorization": f"bearer {KEY}"}).status_code == 200
    for path in ("/health", "/ready"):
        assert httpx.get(base + path).status_code == 200
    response = _post(url, "/chat/completions", {"model": 5}, {"authorization": f"BEARER  {KEY}"})
    assert _error(response, 400)["param"] == "model"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),
        ("stream", "yes"),
        ("n", "2"),
        ("temperature", True),
        ("logprobs", 1),
        ("seed", 1.5),
    ],
)
def test_wrong_types_are_refused_not_coerced(url: str, field: str, value: Any) -> None:
    """Catches lax coercion (`max_tokens: true` ran as 1, `stream: "yes"` as true)."""
    body = {"model": "mimo-tiny", "messages": MESSAGES, "max_tokens": 2, field: value}
    error = _error(_post(url, "/chat/completions", body), 400)
    assert error["param"] == field and error["code"] == "invalid_parameter"


def test_an_integer_is_still_a_number(url: str) -> None:
    """Catches strictness that refuses `temperature: 0` (JSON has one number type)."""
    body = {"model": "mimo-tiny", "messages": MESSAGES, "max_tokens": 2, "temperature": 0, "top_p": 1}
    assert _post(url, "/chat/completions", body).status_code == 200


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 5]}, "stop[1]"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            "messages[0].content[0].text",
        ),
        ({"model": None}, "model"),
        ({"chat_template_kwargs": {"enable_thinking": True, "thinking": 1}}, "chat_template_kwargs.thinking"),
    ],
)
def test_param_is_openai_dotted_without_validation_internals(
    url: str, patch: dict[str, Any], param: str
) -> None:
    """Catches `param` leaking pydantic's union members: `stop.str`,
    `tool_choice.literal['none','auto','required']`, `messages[0].content.str`."""
    body = {"model": "mimo-tiny", "messages": MESSAGES, "max_tokens": 2, **patch}
    error = _error(_post(url, "/chat/completions", body), 400)
    assert error["param"] == param
    assert error["message"].startswith(f"{param}: ")


def test_a_missing_field_is_named(url: str) -> None:
    """Catches a missing required field reported without its name."""
    assert _error(_post(url, "/chat/completions", {"model": "mimo-tiny"}), 400)["param"] == "messages"
    assert _error(_post(url, "/completions", {"model": "mimo-tiny"}), 400)["param"] == "prompt"


def test_lone_surrogates_are_a_400_naming_the_field(url: str) -> None:
    """Catches text that JSON can carry but Unicode cannot (`"\\ud800"`) reaching the tokenizer,
    which raised TypeError: a plain-text 500."""
    raw = '{"model": "mimo-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    error = _error(_post(url, "/chat/completions", raw), 400)
    assert error["param"] == "messages[0].content" and "surrogate" in error["message"]
    raw = '{"model": "mimo-tiny", "max_tokens": 2, "prompt": ["ok", "\\udfff"]}'
    assert _error(_post(url, "/completions", raw), 400)["param"] == "prompt[1]"
    raw = '{"model": "mimo-tiny", "max_tokens": 2, "prompt": "x", "stop": "\\ud83d"}'
    assert _error(_post(url, "/completions", raw), 400)["param"] == "stop"
    tools = '[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "description": "\\ud800"}}}]'
    raw = '{"model": "mimo-tiny", "messages": [{"role": "user", "content": "x"}], "tools": ' + tools + "}"
    assert _error(_post(url, "/chat/completions", raw), 400)["param"] == "tools[0].function.parameters"


def test_body_over_the_limit_is_413_whether_declared_or_chunked(url: str) -> None:
    """Catches a chunked body (no Content-Length) over the limit answered 400 "error parsing the
    body" instead of 413."""

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 1000 + 2):
            yield b" " * 1000

    for content in (b" " * (MAX_BODY + 1), chunks()):
        response = httpx.post(
            url + "/chat/completions",
            content=content,
            headers={"content-type": "application/json", **AUTH},
            timeout=60,
        )
        assert _error(response, 413)["code"] == "body_too_large"
    # a chunked body under the limit is read whole and answered
    body = json.dumps({"model": "mimo-tiny", "messages": MESSAGES, "max_tokens": 2}).encode()
    response = httpx.post(
        url + "/chat/completions",
        content=iter([body[:10], body[10:]]),
        headers={"content-type": "application/json", **AUTH},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def test_tool_parameters_must_be_a_json_schema(url: str) -> None:
    """Catches a tool whose `parameters` is no JSON Schema (`{"type": "banana"}`) being accepted."""
    for parameters in ({"type": "banana"}, {"type": "object", "properties": 3}, {"type": "string"}):
        tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
        body = {"model": "mimo-tiny", "messages": MESSAGES, "tools": tools, "max_tokens": 2}
        assert _error(_post(url, "/chat/completions", body), 400)["param"] == "tools[0].function.parameters"
    good = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": good}}]
    body = {"model": "mimo-tiny", "messages": MESSAGES, "tools": tools, "max_tokens": 2}
    assert _post(url, "/chat/completions", body).status_code == 200


def test_unsupported_content_parts_are_refused(url: str) -> None:
    """Catches an image part being dropped silently (the model would answer without it)."""
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]
    body = {"model": "mimo-tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    error = _error(_post(url, "/chat/completions", body), 400)
    assert error["param"] == "messages[0].content[1].type" and "image_url" in error["message"]
    body["messages"] = [{"role": "user", "content": parts[:1]}]
    assert _post(url, "/chat/completions", body).status_code == 200


class _BrokenClient(EngineClient):
    """An engine client with a bug: raises an unexpected exception."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        raise RuntimeError("a bug")

    async def is_ready(self) -> bool:
        return True


def test_an_unexpected_exception_is_an_openai_json_500() -> None:
    """Catches a plain-text "Internal Server Error" body that OpenAI clients cannot parse."""
    tokenizer = Tokenizer.from_dir(TINY)
    app = build_app(_BrokenClient(), tokenizer, GatewayConfig("mimo-tiny", max_model_len=256))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/completions", json={"model": "mimo-tiny", "prompt": "x", "max_tokens": 2})
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal error (RuntimeError)",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }


class _TransientClient(EngineClient):
    """An engine client whose replica fails each request transiently (lost expert shards), after
    `num_tokens` tokens."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        rid = request.request_id
        if self.num_tokens:
            yield Chunk(rid, [5] * self.num_tokens, "hello")
        yield Chunk(rid, [], "", "error", None, None, "engine step failed: shard gone", 5.0)

    async def is_ready(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [False, True])
def test_a_transient_failure_before_any_output_is_a_503_with_retry_after(stream: bool) -> None:
    """Catches lost expert shards answered as a 500 (or an error inside a 200 stream), which clients
    do not retry, instead of a 503 with Retry-After."""
    tokenizer = Tokenizer.from_dir(TINY)
    app = build_app(_TransientClient(0), tokenizer, GatewayConfig("mimo-tiny", max_model_len=256))
    body = {"model": "mimo-tiny", "messages": MESSAGES, "max_tokens": 4, "stream": stream}
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "retry the request" in response.json()["error"]["message"]


def test_a_transient_failure_after_output_says_retry() -> None:
    """Catches a non-streamed request that failed transiently after some tokens being a 500."""
    tokenizer = Tokenizer.from_dir(TINY)
    app = build_app(_TransientClient(2), tokenizer, GatewayConfig("mimo-tiny", max_model_len=256))
    with TestClient(app) as client:
        response = client.post("/v1/completions", json={"model": "mimo-tiny", "prompt": "x", "max_tokens": 4})
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        body = {"model": "mimo-tiny", "prompt": "x", "max_tokens": 4, "stream": True}
        streamed = client.post("/v1/completions", json=body)
    assert streamed.status_code == 200  # tokens went out: the failure is an error event that says retry
    assert "retry the request" in streamed.text and streamed.text.rstrip().endswith("[DONE]")


def test_reasoning_starts_without_the_templates_newline() -> None:
    """Catches `reasoning_content` starting with "\\n" when `<think>` and its newline arrive in
    different chunks (as the engine streams them)."""
    stream = ReasoningStream(enabled=True)
    pieces = [stream.push(t) for t in ["<think>", "\n", "\n", "Let me", " think.\n", "</think>\n\nHi"]]
    tail = stream.finish()
    assert "".join(p.reasoning for p in pieces) + tail.reasoning == "Let me think."
    assert "".join(p.content for p in pieces) + tail.content == "Hi"
