"""Per-key limits with two gateway replicas, as a user runs it (`mimo serve`, the `openai` client):
Serve's proxy spreads a key's requests over both gateways, and the limit holds for the key, not
once per gateway (`cluster/serving/shared_limits.py`). Direct streaming's replicas share the same store
(tests/integration/test_direct_streaming.py)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import openai
import pytest

from cluster.cli.local_server import free_port
from tests.integration.mimo_serve_process import mimo_serve

pytestmark = pytest.mark.integration
MODEL = "mimo-tiny"
KEY = "sk-shared-limits"
REQUESTS_PER_MINUTE = 4


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("limits")
    (folder / "api-keys").write_text(f"{KEY}\n")
    config = folder / "cluster.yaml"
    config.write_text(
        f"gateway:\n  port: {free_port()}\n  num_replicas: 2\n  api_keys_file: {folder / 'api-keys'}\n"
        f"  requests_per_minute: {REQUESTS_PER_MINUTE}\n"
        "engine:\n  kv_cache_mib: 48\n  max_model_len: 1024\n"
        "attention:\n  num_replicas: 1\n  min_replicas: 1\n  num_cpus: 0.5\n"
        "experts:\n  transport: local\n"
        "autoscaling:\n  enabled: false\n"
    )
    with mimo_serve(config) as (proc, url):
        yield url
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0


def test_a_keys_request_limit_holds_across_gateways(base_url: str) -> None:
    """Catches buckets kept per gateway replica: the proxy spreads the key's requests over both, so
    per-gateway buckets would admit every one. The request over the limit gets 429 + Retry-After."""
    client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)
    outcomes: list[int] = []
    retry_after = None
    for k in range(REQUESTS_PER_MINUTE + 1):
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Name module {k}."}], max_tokens=2
            )
            outcomes.append(200)
        except openai.RateLimitError as e:
            outcomes.append(e.status_code)
            retry_after = e.response.headers.get("retry-after")
    assert outcomes == [200] * REQUESTS_PER_MINUTE + [429], outcomes
    assert retry_after is not None and float(retry_after) > 0
