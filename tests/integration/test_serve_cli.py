"""`mimo serve` as a user runs it: a subprocess that starts its own private Ray cluster, prints the
URL, answers the openai client, and exits 0 on Ctrl-C (SIGINT) leaving no Ray processes behind."""

from __future__ import annotations

import signal
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
    with mimo_serve(config) as (proc, url):
        assert url == f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="mimo-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
