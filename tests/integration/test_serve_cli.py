"""`mimo serve` as a user runs it: a subprocess that starts its own private Ray cluster, prints the
URL, answers the openai client, and exits 0 on Ctrl-C (SIGINT) leaving no Ray processes behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from cluster.local_server import free_port

pytestmark = pytest.mark.integration


def test_mimo_serve_answers_and_shuts_down_on_ctrl_c(tmp_path: Path) -> None:
    """Catches a CLI that joins someone else's cluster, never gets ready, or leaks processes on Ctrl-C."""
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(f"gateway:\n  port: {port}\nengine:\n  kv_cache_mib: 48\n  max_model_len: 1024\n")
    mimo = str(Path(sys.executable).parent / "mimo")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [mimo, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        line = ""
        assert proc.stdout is not None
        while "at http://" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "mimo serve exited early"
            assert time.monotonic() < deadline, "mimo serve did not print its URL"
        url = line.split(" at ", 1)[1].strip()
        assert url == f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="mimo-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
