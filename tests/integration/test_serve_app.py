"""The real application on local Ray (two raylets): Gateway -> prefix-aware router -> 2 Attention
replicas -> 2 expert shard actors, driven by the official `openai` client over HTTP."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx2 as httpx
import openai
import pytest
import ray
from ray import serve

from cluster.cli.local_server import free_port
from cluster.cli.main import main as mimo_main
from cluster.serving.deploy import deploy, wait_running
from cluster.spec import ClusterSpec
from training.tool_scenarios import TOOL_SCHEMAS

pytestmark = pytest.mark.integration
MODEL = "mimo-tiny"
KEY = "sk-cluster-test"
WEATHER = [TOOL_SCHEMAS["get_weather"]]


@pytest.fixture(scope="module")
def app_url(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"{KEY}\n")
    spec = ClusterSpec.from_dict(
        {
            "engine": {"kv_cache_mib": 48, "max_model_len": 1024},
            "attention": {"num_replicas": 2, "num_cpus": 0.5},
            "experts": {"num_shards": 2, "num_cpus": 0.5},
            "gateway": {"port": port, "proxy_location": "HeadOnly", "api_keys_file": str(keys)},
            "autoscaling": {"enabled": False},
        }
    )
    deploy(spec)
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(app_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=app_url, api_key=KEY, max_retries=0, timeout=120)


def test_greedy_through_the_cluster_equals_mimo_generate(
    client: openai.OpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches any difference the gateway, router, Serve hop or remote experts introduce."""
    prompt = "What is the weather in Oslo?"
    assert mimo_main(["generate", "--chat", "--prompt", prompt, "--max-tokens", "32", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["text"]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=32, temperature=0
    )
    assert reply.choices[0].message.content == expected.strip()


def test_tool_round_trip_and_thinking(client: openai.OpenAI) -> None:
    """Catches tool calls or reasoning that work in process but not through Serve (chunk dicts, SSE)."""
    messages: list[dict] = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=WEATHER, tool_choice="required", max_tokens=60, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    city = json.loads(call.function.arguments)["city"]
    result = {"city": city, "temperature": 21, "unit": "celsius", "condition": "sunny"}
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=WEATHER, max_tokens=60, temperature=0
    )
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content
    thought = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 12 + 30?"}],
        max_tokens=120,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    assert (thought.choices[0].message.model_extra or {}).get("reasoning_content")


def test_thinking_switch_of_the_official_api_through_the_cluster(client: openai.OpenAI) -> None:
    """Catches the top-level `thinking` switch (the official MiMo API's, sent as extra_body) being
    ignored on the served path, or a contradiction with enable_thinking not refused."""
    messages = [{"role": "user", "content": "What is 17 times 23? Think step by step."}]

    def ask(**extra: object) -> object:
        return client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=40, temperature=0, extra_body=extra
        )

    on, off = ask(thinking={"type": "enabled"}), ask(thinking={"type": "disabled"})
    assert (on.choices[0].message.model_extra or {}).get("reasoning_content")  # type: ignore[attr-defined]
    assert not (off.choices[0].message.model_extra or {}).get("reasoning_content")  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as refused:
        ask(thinking={"type": "enabled"}, chat_template_kwargs={"enable_thinking": False})
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == "thinking.type"
    assert "chat_template_kwargs.enable_thinking" in body["message"]


def test_errors_and_auth_through_the_cluster(client: openai.OpenAI, app_url: str) -> None:
    """Catches errors that turn into 500s or lose their parameter behind Serve's proxy, and a
    gateway that serves without the configured key."""
    import httpx2

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app_url, api_key="sk-wrong", max_retries=0).models.list()
    for body, param in [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 7}, "top_p"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]}, "messages"),
    ]:
        r = httpx2.post(
            f"{app_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx2.post(
        f"{app_url}/chat/completions",
        content=b"{oops",
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 400


def test_streaming_and_ready(client: openai.OpenAI, app_url: str) -> None:
    """Catches SSE through Serve's proxy breaking, and /ready not reflecting the deployments."""
    import httpx2

    assert httpx2.get(app_url.removesuffix("/v1") + "/ready", timeout=30).status_code == 200
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("n", [2, 3])
def test_n_choices_and_multi_prompt_completions_answer(client: openai.OpenAI, n: int) -> None:
    """Catches n > 1 and multi-prompt completions hanging forever: their sub-requests shared the
    HTTP request's internal id, which Serve's router keys pending requests by, so it matched every
    chosen replica to the first of them and spun. Seeds give reproducible, distinct choices."""
    messages = [{"role": "user", "content": "Name a city."}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, n=n, max_tokens=6, seed=7, temperature=1.0, timeout=60
    )
    assert [c.index for c in chat.choices] == list(range(n))
    assert all(c.finish_reason in ("stop", "length") for c in chat.choices)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, n=n, max_tokens=6, seed=7, temperature=1.0, stream=True, timeout=60
    )
    streamed = [""] * n
    for event in stream:
        for choice in event.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in chat.choices]  # same seeds, same text

    prompts = ["The capital of", "def add(a, b):", "import os"][:n]
    plain = client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0, timeout=60
    )
    assert [c.index for c in plain.choices] == list(range(2 * n))
    assert plain.usage is not None and plain.usage.completion_tokens == 2 * n * 5
    texts = [""] * (2 * n)
    for event in client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0, stream=True, timeout=60
    ):
        for choice in event.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in plain.choices]
    assert texts[0] == texts[1] != texts[2] == texts[3]  # greedy: both choices of a prompt agree


def test_repeated_prefix_is_routed_to_its_cache(client: openai.OpenAI) -> None:
    """Catches a router that spreads a shared prefix over replicas (cache misses) instead of following it."""
    system = "You are a careful assistant for the Python standard library. " * 12
    cached = []
    for question in [
        "What does os.path.join do?",
        "Explain itertools.chain.",
        "What is a deque?",
        "Define zip.",
    ]:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        time.sleep(1.2)  # two routing-stats periods: the router has the replica's report
    assert cached[0] == 0
    assert all(c >= 16 * (len(system) // 80) for c in cached[1:]), cached


def test_killed_attention_replica_fails_only_its_requests_retriably(
    client: openai.OpenAI, app_url: str
) -> None:
    """Catches a replica death that hangs clients or takes down requests on the other replica, and
    a /ready that answers 503 while Serve restarts it although the other replica serves."""
    victim_pid = _an_attention_replica_pid()
    threads, results = _streams(client, 6, max_tokens=120)
    time.sleep(1.0)
    os.kill(victim_pid, signal.SIGKILL)
    ready_url = app_url.removesuffix("/v1") + "/ready"
    ready_while_restarting = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(ready_while_restarting) < 3:
        attention = serve.status().applications["mimo"].deployments["Attention"]
        if attention.status != "HEALTHY":  # Serve noticed the death and restarts the replica
            ready_while_restarting.append(httpx.get(ready_url, timeout=30).status_code)
        time.sleep(0.2)
    assert ready_while_restarting and set(ready_while_restarting) == {200}, ready_while_restarting
    for t in threads:
        t.join(timeout=180)
    assert len(results) == 6, results
    assert "done" in results  # the other replica kept serving
    assert all(r == "done" or r.startswith(("status 503", "error")) for r in results), results
    wait_running()
    after = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert after.choices[0].finish_reason in ("stop", "length")


def _an_attention_replica_pid() -> int:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"] if isinstance(actor, dict) else actor
        if "Attention" in name and "SERVE_REPLICA" in name:
            handle = ray.get_actor(
                name, namespace=actor.get("namespace", "serve") if isinstance(actor, dict) else "serve"
            )
            return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid())))
    raise AssertionError("no Attention replica actor found")


def _streams(client: openai.OpenAI, n: int, max_tokens: int = 80) -> tuple[list[threading.Thread], list[str]]:
    """`n` streaming chats started in threads; each appends how it ended: "done", "status N" (an
    HTTP error), "error ..." (an SSE error event) or "dropped ..." (the connection went)."""
    results: list[str] = []

    def one(i: int) -> None:
        try:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Tell me about fault number {i}"}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    results.append("done")
                    return
            results.append("cut")
        except openai.APIStatusError as e:
            results.append(f"status {e.status_code}")
        except (openai.APIConnectionError, httpx.HTTPError) as e:
            results.append(f"dropped {type(e).__name__}")
        except openai.APIError as e:
            results.append(f"error {e.message[:40]}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _serving_again(client: openai.OpenAI, timeout_s: float = 120.0) -> float:
    """Seconds until a request succeeds again (the recovery time)."""
    started = time.monotonic()
    while True:
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            return time.monotonic() - started
        except (openai.APIStatusError, openai.APIConnectionError):
            assert time.monotonic() - started < timeout_s, "the cluster did not serve again"
            time.sleep(0.5)


def _named_actor(fragment: str) -> object:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if fragment in actor["name"]:
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor named like {fragment}")


def test_killed_serve_controller_loses_no_request(client: openai.OpenAI) -> None:
    """Catches a data path that depends on Serve's controller: with the controller killed mid-stream
    (Ray restarts it), every running stream still finishes, and new requests are served."""
    threads, results = _streams(client, 4)
    time.sleep(1.0)
    ray.kill(_named_actor("SERVE_CONTROLLER_ACTOR"), no_restart=False)
    for t in threads:
        t.join(timeout=180)
    assert results == ["done"] * 4, results
    _serving_again(client)
    wait_running()


def test_killed_proxy_or_gateway_ends_its_streams_and_the_cluster_serves_again(client: openai.OpenAI) -> None:
    """Catches streams that hang when the HTTP proxy or the gateway replica under them dies, and a
    cluster that does not come back: each running stream ends (finished, or with an error the
    client sees), and requests are served again once Serve has restarted the actor."""
    for fragment in ("SERVE_PROXY_ACTOR", "SERVE_REPLICA::mimo#Gateway"):
        threads, results = _streams(client, 4, max_tokens=200)
        time.sleep(1.0)
        ray.kill(_named_actor(fragment), no_restart=False)
        for t in threads:
            t.join(timeout=180)
        assert len(results) == 4, (fragment, results)  # none still waiting
        assert all(r == "done" or r.startswith(("dropped", "status 5", "error", "cut")) for r in results)
        _serving_again(client)
        wait_running()
