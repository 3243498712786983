"""Schemathesis against the gateway's own OpenAPI schema over real HTTP: whatever a client sends
(valid or not), the answer is never a 5xx and always conforms to the documented status codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from cluster.local_server import LocalServer
from gateway.config import GatewayConfig
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from replicas.async_engine import AsyncEngine
from replicas.engine import Engine
from replicas.engine_config import EngineConfig

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "mimo-tiny"


def test_no_server_errors_for_any_generated_request() -> None:
    """Catches any input that crashes a handler (500) or gets an undocumented response; schemathesis'
    CLI generates the requests from /openapi.json and runs its checks, its exit status is the verdict."""
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_dir(TINY)
    # a short context bounds the work of any generated request
    config = EngineConfig(kv_cache_bytes=16 * 2**20, max_model_len=48, max_num_batched_tokens=256)
    server = LocalServer.start(
        AsyncEngine(Engine(load_model(TINY), tokenizer, config)),
        tokenizer,
        GatewayConfig("mimo-tiny", max_model_len=48),
    )
    try:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                server.url.removesuffix("/v1") + "/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance",
                "--max-examples",
                "40",
                "--request-timeout",
                "60",
                "--seed",
                "1",
                "--phases",
                "examples,coverage,fuzzing",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
