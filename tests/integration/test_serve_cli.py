"""`mimo serve` as a user runs it: a subprocess that starts its own private Ray cluster, says where
the API, metrics and dashboard are, answers the openai client, and exits 0 on Ctrl-C (SIGINT)
without alarming output."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from cluster.cli.local_server import free_port
from tests.integration.mimo_serve_process import mimo_serve

pytestmark = pytest.mark.integration


def test_mimo_serve_answers_and_shuts_down_on_ctrl_c(tmp_path: Path) -> None:
    """Catches a CLI that joins someone else's cluster, never gets ready, or leaks processes on Ctrl-C."""
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(f"gateway:\n  port: {port}\nengine:\n  kv_cache_mib: 48\n  max_model_len: 1024\n")
    where: dict[str, str] = {}
    with mimo_serve(config, "--attention-replicas", "1", where=where) as (proc, url):
        assert url == f"http://127.0.0.1:{port}/v1"
        assert set(where) == {"metrics", "dashboard", "stop"}
        assert where["dashboard"].startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="mimo-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens >= 1
        metrics_url = where["metrics"].split()[0]
        assert metrics_url.startswith("http://127.0.0.1:") and metrics_url.endswith("/metrics")
        _wait_for_series(metrics_url, "ray_mimo_generation_tokens_total")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0
        assert out.strip() == "mimo serve: shutting down", out  # no raylet retries or other noise


def _wait_for_series(url: str, name: str, timeout_s: float = 60.0) -> None:
    """Ray's metrics agent exports what replicas record every few seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        if any(line.startswith(name) for line in text.splitlines()):
            return
        assert time.monotonic() < deadline, f"{url} has no {name} after {timeout_s} s"
        time.sleep(1.0)
