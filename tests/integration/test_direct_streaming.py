"""Direct streaming as a user runs it: `mimo serve` with `gateway.direct_streaming` starts its own
Ray cluster with HAProxy, and the official `openai` client talks to HAProxy, which asks the route
chooser for a replica and sends the request straight to that attention replica's own API."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import openai
import pytest

from cluster.cli import main as mimo_main
from cluster.local_server import free_port
from tests.integration.mimo_serve_process import mimo_serve

pytestmark = pytest.mark.integration
MODEL = "mimo-tiny"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    config = tmp_path_factory.mktemp("direct") / "cluster.yaml"
    config.write_text(
        f"gateway:\n  port: {port}\n  direct_streaming: true\n"
        "engine:\n  kv_cache_mib: 48\n  max_model_len: 1024\n"
        "attention:\n  num_replicas: 2\n  num_cpus: 0.5\n"
        "experts:\n  transport: local\n"
        "autoscaling:\n  enabled: false\n"
    )
    with mimo_serve(config) as (proc, url):
        _wait_ready(url.removesuffix("/v1") + "/ready", time.monotonic() + 120)
        _wait_routed(url, time.monotonic() + 90)
        yield url
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0


def _wait_ready(url: str, deadline: float) -> None:
    """HAProxy learns the replicas' ports a moment after Serve reports the application running."""
    import httpx2

    while True:
        try:
            if httpx2.get(url, timeout=10).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered 200"
        time.sleep(1)


def _wait_routed(url: str, deadline: float) -> None:
    """Until a repeated prompt hits its cache: right after start HAProxy may still be loading the
    replicas' ports and send requests through Serve's fallback proxy, which the chooser never sees.
    A chooser whose answers HAProxy ignores never gets here (the deadline fails the module)."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    for k in range(1000):
        system = f"Warm-up {k}. Answer in one short sentence. " * 8
        cached = []
        for _ in range(2):
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": system}], max_tokens=2, temperature=0
            )
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
            time.sleep(1.2)
        if cached[1] > 0:
            return
        assert time.monotonic() < deadline, "repeated prompts never hit their cache"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def test_greedy_streaming_equals_mimo_generate(
    client: openai.OpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches any difference the route chooser, HAProxy or the replica-side API introduce, and a
    stream that loses its usage chunk on the way through HAProxy."""
    prompt = "What is the weather in Oslo?"
    assert mimo_main(["generate", "--chat", "--prompt", prompt, "--max-tokens", "24", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["text"]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected.strip()  # a non-streamed message is stripped; deltas are not
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24


def test_each_prefix_is_routed_to_its_cache(client: openai.OpenAI) -> None:
    """Catches a chooser whose answer HAProxy ignores (it then balances on its own: with 2 replicas
    each repeat would miss half the time) or that hashes other tokens than the replica caches."""
    cached = []
    for k in range(4):
        system = f"Assistant number {k}. Answer with one short sentence about the standard library. " * 6
        for question in ("What does os.path.join do?", "Explain itertools.chain."):
            reply = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                max_tokens=4,
                temperature=0,
            )
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
            time.sleep(1.2)  # two routing-stats periods: the chooser has the replica's report
    firsts, repeats = cached[0::2], cached[1::2]
    assert all(c == 0 for c in firsts), cached
    assert all(c >= 64 for c in repeats), cached  # each system prompt is ~100 tokens: its blocks hit


def test_bad_requests_get_the_apis_own_errors(client: openai.OpenAI, base_url: str) -> None:
    """Catches errors turned into HAProxy's 503 (a failed route) instead of the replica's 400 naming
    the field: the chooser must route a body it cannot render, not refuse it."""
    import httpx2

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
    response = httpx2.post(
        base_url + "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert info.value.body["param"] == "model"  # type: ignore[index]
