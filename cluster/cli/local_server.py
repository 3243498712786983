"""The OpenAI API over one in-process engine, served by uvicorn on a background thread.

For tests and one-process runs: the same gateway app as the cluster, with the engine in this
process instead of behind Serve. `LocalServer.start(...)` returns once the port accepts requests.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from cluster.serving.engine_clients import InProcessEngineClient
from gateway.api import build_app
from gateway.config import GatewayConfig
from mimo.tokenizer import Tokenizer
from replicas.engine.async_engine import AsyncEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServer:
    server: uvicorn.Server
    thread: threading.Thread
    engine: AsyncEngine
    url: str

    @staticmethod
    def start(
        engine: AsyncEngine,
        tokenizer: Tokenizer,
        config: GatewayConfig,
        port: int | None = None,
        max_streams: int = 1024,
    ) -> LocalServer:
        port = port or free_port()
        app = build_app(InProcessEngineClient(engine, max_streams), tokenizer, config)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="mimo-gateway", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return LocalServer(server, thread, engine, f"http://127.0.0.1:{port}/v1")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()
