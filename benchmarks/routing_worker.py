"""One attention replica as its own HTTP endpoint, for routers that sit in front of plain URLs.

The gateway's OpenAI API over one engine built exactly like an `Attention` replica of the spec (same
engine config, experts in process, same torch threads), in one of two hosts:
- `ServeWorker`, a Serve deployment: one application per replica, each under its own route prefix,
  so routers in front of URLs face the same Serve replicas (Ray's threads, Serve's proxy and
  streaming path) as the routers inside the Serve application;
- `python benchmarks/routing_worker.py --port P --spec JSON`, a bare process (uvicorn,
  `cluster.cli.local_server.LocalServer`) until SIGTERM: what the same engines do without Serve.
Besides the API it answers what sglang-router asks a worker for (`/server_info`, `/model_info`) and
`POST /probe`: the prompt tokens this engine's prefix cache would hit right now, looked up on the
engine thread between steps, which is what the benchmark's oracle router asks every replica.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi import APIRouter, FastAPI  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from cluster.spec import ClusterSpec  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from mimo.tokenizer import Tokenizer  # noqa: E402
from protocol.block_hash import block_hashes  # noqa: E402
from replicas.engine.async_engine import AsyncEngine  # noqa: E402
from replicas.engine.engine import Engine  # noqa: E402

_Probe = tuple[list[int], str | None, asyncio.AbstractEventLoop, "asyncio.Future[int]"]


class ProbingEngine(AsyncEngine):
    """An `AsyncEngine` that also answers prefix-cache probes. They are served on the engine thread
    where it drains its commands (between two steps), so a lookup never sees a half-applied step."""

    def __init__(self, engine: Engine, stream_interval_s: float) -> None:
        self._probes: queue.Queue[_Probe] = queue.Queue()  # before the thread starts draining
        super().__init__(engine, stream_interval_s)

    async def probe(self, prompt_token_ids: list[int], salt: str | None) -> int:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._probes.put((prompt_token_ids, salt, loop, future))
        self._wake.set()
        return await future

    def _drain_commands(self) -> None:
        block_size = self.engine.kv_cache.layout.block_size
        while True:
            try:
                token_ids, salt, loop, future = self._probes.get_nowait()
            except queue.Empty:
                break
            hit = self.engine.kv_cache.lookup(block_hashes(token_ids, block_size, salt), len(token_ids))
            loop.call_soon_threadsafe(future.set_result, hit)
        super()._drain_commands()


class ProbeBody(BaseModel):
    prompt_token_ids: list[int]
    salt: str | None = None


def extra_routes(engine: ProbingEngine, served_name: str, model_path: str) -> APIRouter:
    routes = APIRouter()

    @routes.post("/probe")
    async def probe(body: ProbeBody) -> dict[str, int]:
        return {"cached_tokens": await engine.probe(body.prompt_token_ids, body.salt)}

    @routes.get("/server_info")
    async def server_info() -> dict[str, Any]:
        return {"model_path": model_path, "served_model_name": served_name, "dp_size": 1}

    @routes.get("/model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": model_path, "tokenizer_path": model_path, "is_generation": True}

    return routes


@dataclass(frozen=True)
class Worker:
    """What one worker serves: the probing engine and the gateway's settings for its API."""

    engine: ProbingEngine
    tokenizer: Tokenizer
    config: GatewayConfig
    max_streams: int


def build_worker(spec: ClusterSpec) -> Worker:
    import torch

    from cluster.serving.attention_deployment import engine_config
    from cluster.serving.gateway_deployment import max_model_len
    from mimo.weights import load_model

    torch.set_num_threads(spec.engine.threads)
    model = load_model(spec.model.path, dtype=getattr(torch, spec.model.dtype), experts="all")
    tokenizer = Tokenizer.from_dir(spec.model.path)
    engine = ProbingEngine(
        Engine(model, tokenizer, engine_config(spec)), spec.engine.stream_interval_ms / 1000
    )
    config = GatewayConfig(served_model_name=spec.model.served_name, max_model_len=max_model_len(spec))
    return Worker(engine, tokenizer, config, spec.engine.max_num_seqs + spec.engine.max_queued_requests)


class ServeWorker:
    """Serve deployment body (wrapped with `serve.ingress()` by the benchmark): one worker per replica."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = ClusterSpec.model_validate(spec)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from cluster.serving.engine_clients import InProcessEngineClient
        from gateway.api import build_app

        w = build_worker(self.spec)
        app = build_app(InProcessEngineClient(w.engine, w.max_streams), w.tokenizer, w.config)
        app.include_router(extra_routes(w.engine, self.spec.model.served_name, self.spec.model.path))
        return app


def main() -> None:
    from cluster.cli.local_server import LocalServer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec", required=True, help="the ClusterSpec as JSON")
    args = parser.parse_args()
    spec = ClusterSpec.model_validate_json(args.spec)
    w = build_worker(spec)
    server = LocalServer.start(w.engine, w.tokenizer, w.config, port=args.port, max_streams=w.max_streams)
    app = server.server.config.app  # the FastAPI app: routes added now are served from now on
    assert isinstance(app, FastAPI)
    app.include_router(extra_routes(w.engine, spec.model.served_name, spec.model.path))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"ready {server.url}", flush=True)
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
