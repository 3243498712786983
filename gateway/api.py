"""The OpenAI-compatible HTTP API: `build_app(client, tokenizer, config)` -> a FastAPI app.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (the process
is up), GET /ready (the cluster can serve). The key and the body size are checked before the body
is parsed (`gateway.middleware`), pending-request and rate limits before any engine work; metrics
are not served here (they go to the node's Ray metrics port, never the public one).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.auth import KeyStore, Tenant
from gateway.config import GatewayConfig
from gateway.engine_client import EngineClient, EngineError
from gateway.errors import APIError, install_error_handlers
from gateway.middleware import BearerAuth, BodyLimit, CountRequests
from gateway.openai_chat import chat_completion
from gateway.openai_completions import completion
from gateway.rate_limit import Limits, LocalLimits
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from mimo.tokenizer import Tokenizer
from observability.recorder import Metrics, PrometheusBackend


class Gateway:
    """Per-process state behind the routes."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer: Tokenizer,
        config: GatewayConfig,
        metrics: Metrics,
        limits: Limits,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.config = config
        self.limits = limits
        self.num_pending = 0

    def check_model(self, model: str) -> None:
        if model != self.config.served_model_name:
            raise APIError(
                400,
                f"model {model!r} is not served here; use {self.config.served_model_name!r}",
                "model",
                "model_not_found",
            )

    async def admit(self, tenant: Tenant, num_tokens: int) -> None:
        refusal = await self.limits.admit(tenant.key_id, num_tokens)
        if refusal is not None:
            self.metrics.rate_limited(refusal.bucket)
            raise APIError(
                429, "rate limit exceeded for this API key", None, "rate_limit_exceeded", refusal.wait_s
            )

    def charge(self, tenant: Tenant, num_tokens: int) -> None:
        self.limits.charge(tenant.key_id, num_tokens)


def build_app(
    client: EngineClient,
    tokenizer: Tokenizer,
    config: GatewayConfig,
    metrics: Metrics | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """`limits`: where per-key limits are kept; default this process (`LocalLimits`)."""
    app = FastAPI(title="mimo-serve", version="0.1.0")
    limits = limits or LocalLimits(config.requests_per_minute, config.tokens_per_minute)
    state = Gateway(client, tokenizer, config, metrics or Metrics(PrometheusBackend()), limits)
    app.state.gateway = state
    install_error_handlers(app)
    keys = KeyStore.from_file(config.api_keys_file) if config.api_keys_file else KeyStore([])
    # the last added runs first: count every request, then the key, then the body size
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(BearerAuth, keys=keys)
    app.add_middleware(CountRequests, record=state.metrics.http_request)

    async def run(request: Request, handler: Any, body: Any) -> Response:
        tenant: Tenant = request.state.tenant
        state.check_model(body.model)
        if state.num_pending >= config.max_pending_requests:
            raise APIError(503, "the gateway is at capacity; retry shortly", None, "overloaded", 1.0)
        state.num_pending += 1
        release = True
        try:
            response: Response = await handler(state, tenant, body, f"{uuid.uuid4().hex}")
            if isinstance(response, StreamingResponse):
                release = False  # the stream releases its slot when it ends, however it ends
                response.body_iterator = _releasing(response.body_iterator, state)
            return response
        except EngineError as e:
            r = e.refusal
            raise APIError(r.status, r.message, r.param, None, r.retry_after_s) from None
        finally:
            if release:
                state.num_pending -= 1

    @app.post("/v1/chat/completions", response_model=None, operation_id="createChatCompletion")
    async def chat(request: Request, body: ChatCompletionRequest) -> Response:
        return await run(request, chat_completion, body)

    @app.post("/v1/completions", response_model=None, operation_id="createCompletion")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await run(request, completion, body)

    @app.get("/v1/models", operation_id="listModels")
    async def models() -> dict[str, Any]:
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "mimo-serve",
            "max_model_len": config.max_model_len,
            # what a request gets for the sampling fields it leaves out (generation_config.json)
            "sampling_defaults": config.sampling_defaults.present(),
            "default_thinking": config.default_thinking,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", response_model=None)
    async def ready() -> Response:
        if await state.client.is_ready():
            return JSONResponse({"status": "ready"})
        return APIError(503, "not every replica and expert shard is up", None, "not_ready", 1.0).response()

    _document_errors(app)
    return app


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERRORS = {
    "400": "invalid request (param names the field)",
    "401": "missing or invalid API key",
    "413": "body too large",
    "500": "internal error (a bug: please report it)",
    "429": "rate limited (Retry-After)",
    "503": "overloaded or not ready (Retry-After)",
}


# One server-sent event: `data:` holds a JSON chunk (or an error object), then `[DONE]`
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}
# A client lists the models, then asks one of them: OpenAPI links that let a stateful fuzzer
# (schemathesis) chain the two with the served model id
_MODEL_LINKS = {
    name: {"operationId": operation, "requestBody": {"model": "$response.body#/data/0/id"}}
    for name, operation in (
        ("ChatWithListedModel", "createChatCompletion"),
        ("CompleteWithListedModel", "createCompletion"),
    )
}


def _document_errors(app: FastAPI) -> None:
    """The schema says what the API really answers: OpenAI error objects, never FastAPI's 422;
    and how a listed model id feeds the completion routes."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            for path in schema["paths"].values():
                for operation in path.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    for status, text in _ERRORS.items():
                        responses[status] = {
                            "description": text,
                            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                        }
            for route in ("/v1/chat/completions", "/v1/completions"):  # `stream: true` answers SSE
                ok = schema["paths"][route]["post"]["responses"]["200"]
                ok["description"] = "the completion (JSON), or with stream: true its chunks (SSE)"
                ok["content"]["text/event-stream"] = {"schema": _SSE_EVENT}
            schema["paths"]["/v1/models"]["get"]["responses"]["200"]["links"] = _MODEL_LINKS
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _releasing(body: AsyncIterable[Any], state: Gateway) -> AsyncIterator[Any]:
    try:
        async for part in body:
            yield part
    finally:
        try:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            state.num_pending -= 1
