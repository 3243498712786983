"""The expert pool scales on its own measured load: 1 -> 2 shards under traffic and back to 1 when
idle, each step a live placement switch, with greedy outputs unchanged before, during and after;
and a pool shrunk below its first placement group grows back into that group's bundles."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import ray
from ray import serve
from ray.util import placement_group_table

from cluster.cli.local_server import free_port
from cluster.serving.deploy import deploy
from cluster.serving.expert_pool_deployment import ExpertPoolDeployment
from cluster.serving.gateway_deployment import APP_NAME
from cluster.spec import ClusterSpec

pytestmark = pytest.mark.integration
MODEL = "mimo-tiny"
PROMPT = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def cluster_url(ray_cluster: object) -> Iterator[str]:
    port = free_port()
    spec = ClusterSpec.from_dict(
        {
            "engine": {"kv_cache_mib": 48, "max_model_len": 1024},
            "attention": {"num_replicas": 1, "min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5},
            "experts": {
                "num_shards": 1,
                "min_shards": 1,
                "max_shards": 2,
                "num_cpus": 0.5,
                "eplb_interval_s": 0,
            },
            "gateway": {"port": port, "proxy_location": "HeadOnly"},
            # any measurable expert work counts as load here, so the step up is certain
            "autoscaling": {
                "expert_target_load": 0.02,
                "upscale_delay_s": 2,
                "downscale_delay_s": 6,
                "cooldown_s": 4,
            },
        }
    )
    deploy(spec)
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


def _num_shards() -> int:
    pool = serve.get_deployment_handle("ExpertPool", APP_NAME)
    return len(pool.current.remote().result(timeout_s=30).actors)


def test_pool_grows_under_load_and_shrinks_when_idle(cluster_url: str) -> None:
    """Catches a pool that never resizes, loses requests while switching, or changes outputs."""
    client = openai.OpenAI(base_url=cluster_url, api_key="unused", max_retries=0, timeout=120)

    def greedy() -> str:
        reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0)
        return reply.choices[0].message.content or ""

    expected = greedy()
    assert _num_shards() == 1
    stop, outcomes = threading.Event(), []

    def load() -> None:
        while not stop.is_set():
            outcomes.append(greedy())

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _num_shards() < 2:
        time.sleep(1)
    grown = _num_shards()
    time.sleep(3)  # traffic over the new placement
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert grown == 2
    assert outcomes and all(o == expected for o in outcomes)  # every request, across the switch
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _num_shards() > 1:
        time.sleep(1)
    assert _num_shards() == 1
    assert greedy() == expected


def test_shrinking_below_the_first_group_and_growing_back_reuses_its_bundles(ray_cluster: object) -> None:
    """Catches a pool that reserves a new placement group for a shard its first group still has a
    bundle for (every shrink-and-grow cycle would leak a shard's CPUs), and regrown shards that do
    not hold the experts of the placement they serve."""
    spec = ClusterSpec.from_dict(
        {
            "experts": {
                "num_shards": 2,
                "min_shards": 1,
                "max_shards": 3,
                "num_cpus": 0.5,
                "eplb_interval_s": 0,
            }
        }
    )
    pool = ExpertPoolDeployment(spec)

    def live_groups() -> int:
        return sum(g["state"] == "CREATED" for g in placement_group_table().values())

    async def resize_through(sizes: list[int]) -> list[int]:
        counts = []
        for n in sizes:
            await pool._resize(n)
            counts.append(live_groups())
        return counts

    try:
        before = live_groups()
        counts = asyncio.run(resize_through([1, 2, 3, 2]))
        assert [c - before for c in counts] == [0, 0, 1, 0]
        assert len(pool.actors) == 2 and pool.actors[1] is pool.pool.actors[1]
        held = ray.get([a.keys.remote() for a in pool.actors], timeout=60)
        assert [sorted(k) for k in held] == [sorted(pool.placement.experts_of_shard(s)) for s in range(2)]
    finally:
        for group in [pool.pool, *pool.added.values()]:
            group.shutdown()
        pool.added.clear()
