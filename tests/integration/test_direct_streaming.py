"""Direct streaming as a user runs it: `mimo serve` with `gateway.direct_streaming` starts its own
Ray cluster with HAProxy, and the official `openai` client talks to HAProxy, which asks the route
chooser for a replica and sends the request straight to that attention replica's own API.

API keys and a per-key request limit are on, as a platform team runs it. Each test uses its own
keys (a tenant each), so one test's requests never spend another's limit or warm its cache. The
router's guesses are off: only the replicas' reports, whose block hashes carry the tenant's salt,
can send a repeated prompt to its cache, so the chooser must hash with the salt too."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import openai
import pytest

from cluster.cli.local_server import free_port
from cluster.cli.main import main as mimo_main
from tests.integration.mimo_serve_process import mimo_serve

pytestmark = pytest.mark.integration
MODEL = "mimo-tiny"
REQUESTS_PER_MINUTE = 6
WARM_UP_KEYS = [f"warm-up-{k}" for k in range(40)]  # one per warm-up round: 2 requests each
PREFIX_KEYS = [f"prefix-{k}" for k in range(4)]
KEYS = [*WARM_UP_KEYS, *PREFIX_KEYS, "greedy", "errors", "limit", "tenant-a", "tenant-b"]


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    folder = tmp_path_factory.mktemp("direct")
    (folder / "api-keys").write_text("\n".join(KEYS) + "\n")
    config = folder / "cluster.yaml"
    config.write_text(
        f"gateway:\n  port: {port}\n  direct_streaming: true\n"
        f"  api_keys_file: {folder / 'api-keys'}\n  requests_per_minute: {REQUESTS_PER_MINUTE}\n"
        "router:\n  guess_ttl_s: 0\n"
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
    A chooser whose answers HAProxy ignores, or that hashes without the tenant's salt (the guesses
    are off), never gets here: the deadline fails the module."""
    for k, key in enumerate(WARM_UP_KEYS):
        client = _client(url, key)
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
    raise AssertionError("repeated prompts never hit their cache")


def test_greedy_streaming_equals_mimo_generate(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches any difference the route chooser, HAProxy or the replica-side API introduce, and a
    stream that loses its usage chunk on the way through HAProxy."""
    prompt = "What is the weather in Oslo?"
    assert mimo_main(["generate", "--chat", "--prompt", prompt, "--max-tokens", "24", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["text"]
    stream = _client(base_url, "greedy").chat.completions.create(
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


def test_each_prefix_is_routed_to_its_cache(base_url: str) -> None:
    """Catches a chooser whose answer HAProxy ignores (it then balances on its own: with 2 replicas
    each repeat would miss half the time) or that hashes other tokens than the replica caches,
    such as a prompt without its tenant's salt (the Authorization header not reaching the chooser)."""
    cached = []
    for k, key in enumerate(PREFIX_KEYS):
        client = _client(base_url, key)
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


def test_bad_requests_get_the_apis_own_errors(base_url: str) -> None:
    """Catches errors turned into HAProxy's 503 (a failed route) instead of the replica's 400 naming
    the field or 401: the chooser must route a body it cannot render, or a request without a valid
    key, not refuse it."""
    import httpx2

    client = _client(base_url, "errors")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
    response = httpx2.post(
        base_url + "/chat/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json", "Authorization": "Bearer errors"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert info.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        _client(base_url, "not-a-key").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert httpx2.post(base_url + "/chat/completions", json=body, timeout=120).status_code == 401


def test_tenants_never_share_cached_blocks(base_url: str) -> None:
    """Catches a tenant reading another's cache through direct streaming (the replica must salt
    what it stores and looks up with the key's salt, whichever replica the chooser picked)."""
    system = "A shared system prompt that two tenants both send, word for word, each time. " * 6
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello?"}]
    cached = []
    for key in ("tenant-a", "tenant-a", "tenant-b"):
        reply = _client(base_url, key).chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, temperature=0
        )
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        time.sleep(1.2)
    assert cached[0] == 0 and cached[1] >= 64 and cached[2] == 0, cached


def test_a_keys_request_limit_holds_across_replicas(base_url: str) -> None:
    """Catches limits kept per attention replica: the key's requests go to both replicas (distinct
    prompts), so per-replica buckets would admit all of them. The one over the limit gets 429 with
    Retry-After, and nothing runs for it."""
    import httpx2

    statuses, retry_after = [], None
    for k in range(REQUESTS_PER_MINUTE + 1):
        response = httpx2.post(
            base_url + "/chat/completions",
            json={
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": f"Question number {k}: name a Python module. " * (k + 1)}
                ],
                "max_tokens": 2,
            },
            headers={"Authorization": "Bearer limit"},
            timeout=120,
        )
        statuses.append(response.status_code)
        retry_after = response.headers.get("retry-after", retry_after)
    assert statuses == [200] * REQUESTS_PER_MINUTE + [429], statuses
    assert retry_after is not None and float(retry_after) > 0
