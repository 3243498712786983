"""Greedy outputs through the served application are the same over every expert transport
(`experts.transport`: channel, ray, local), on local Ray with two raylets: with `channel` each
attention replica reaches the shard on its own raylet over the shared-memory channel and the other
over Ray, so both paths carry the same requests."""

from __future__ import annotations

import json

import openai
import pytest
from ray import serve

from cluster.cli.local_server import free_port
from cluster.cli.main import main as mimo_main
from cluster.serving.deploy import deploy
from cluster.spec import ClusterSpec

pytestmark = pytest.mark.integration
PROMPTS = ["What is the weather in Oslo?", "Write a haiku about a lighthouse keeper."]


def _served_texts(transport: str) -> list[str]:
    port = free_port()
    spec = ClusterSpec.from_dict(
        {
            "engine": {"kv_cache_mib": 48, "max_model_len": 1024},
            "attention": {"num_replicas": 2, "num_cpus": 0.5},
            "experts": {"num_shards": 2, "num_cpus": 0.5, "transport": transport},
            "gateway": {"port": port, "proxy_location": "HeadOnly"},
            "autoscaling": {"enabled": False},
        }
    )
    deploy(spec)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        texts = []
        for prompt in PROMPTS * 2:  # twice: both replicas (the second time from the prefix cache)
            reply = client.chat.completions.create(
                model="mimo-tiny",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=32,
                temperature=0,
            )
            texts.append(reply.choices[0].message.content or "")
        return texts
    finally:
        serve.shutdown()


def test_greedy_outputs_are_the_same_over_every_transport(
    ray_cluster: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches a transport that changes what the model computes (rows, ids or weights lost or
    reordered in the shared buffers, a partial output from the wrong call)."""
    expected = []
    for prompt in PROMPTS:
        assert mimo_main(["generate", "--chat", "--prompt", prompt, "--max-tokens", "32", "--json"]) == 0
        expected.append(json.loads(capsys.readouterr().out)["text"].strip())
    for transport in ("channel", "ray", "local"):
        assert _served_texts(transport) == expected * 2, transport
