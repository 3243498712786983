"""Experts on Ray actors across two raylets: greedy outputs through 2 and 4 expert shards equal the
single-process engine's, and a shard killed mid-generation loses no request and no token, over both
served transports: Ray actor calls, and the same-node channel (`transport_channel.py`; the driver's
node's shards over the channel, the other raylet's over Ray)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from replicas.experts.dispatch import ExpertDispatcher
from replicas.experts.expert_placement import initial_placement
from replicas.experts.expert_pool import ExpertPool, ShardResources
from replicas.experts.transport_channel import ChannelTransport
from replicas.experts.transport_ray import RayTransport
from tests.factory import random_config_dict, write_random_checkpoint

pytestmark = pytest.mark.integration
TOKENIZER = Path(__file__).resolve().parents[2] / "checkpoints" / "mimo-tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint(path, random_config_dict(max_position_embeddings=512))
    return path


def _outputs(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    out = engine.generate([GenerateRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert all(c.error is None for chunks in out.values() for c in chunks)
    return [[t for c in out[f"r{i}"] for t in c.token_ids] for i in range(len(prompts))]


def _engine(path: Path, dispatcher: ExpertDispatcher | None) -> Engine:
    model = load_model(path, experts="all" if dispatcher is None else "none")
    config = EngineConfig(block_size=4, max_model_len=256, num_mtp_drafts=2)
    return Engine(model, Tokenizer.from_dir(TOKENIZER), config, dispatcher)


PROMPTS = [[5, 6, 7], list(range(10, 50)), [9] * 17, list(range(100, 130))]
TRANSPORTS = ["ray", "channel"]


def _transport(pool: ExpertPool, kind: str, call_timeout_s: float = 120.0) -> RayTransport | ChannelTransport:
    return pool.transport(call_timeout_s) if kind == "ray" else pool.channel_transport(call_timeout_s)


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("num_shards", [2, 4])
def test_ray_shards_match_single_process(
    ray_cluster: object, checkpoint: Path, num_shards: int, kind: str
) -> None:
    """Catches any difference a transport or a shard split introduces (routing, packed payloads,
    shared buffers), with and without ping-pong micro-batches (two calls in flight per shard)."""
    expected = _outputs(_engine(checkpoint, None), PROMPTS)
    placement = initial_placement(list(range(1, 7)), 16, num_shards)
    pool = ExpertPool.start(checkpoint, placement, ShardResources(num_cpus=0.5))
    try:
        nodes = {ray.get(a.node_id.remote()) for a in pool.actors}
        for ping_pong in (False, True):
            transport = _transport(pool, kind)
            dispatcher = ExpertDispatcher(transport, placement, 16, ping_pong=ping_pong)
            assert _outputs(_engine(checkpoint, dispatcher), PROMPTS) == expected
            if isinstance(transport, ChannelTransport):  # both paths ran: this node's and the other's
                assert transport.num_channel_calls > 0 and transport.num_ray_calls > 0
        assert len(nodes) == 2  # SPREAD put shards on both raylets
    finally:
        pool.shutdown()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_killed_shard_is_restarted_and_no_request_is_lost(
    ray_cluster: object, checkpoint: Path, kind: str
) -> None:
    """Catches a dead expert process failing requests instead of being restarted and retried (over
    the channel: the lost call is sent again over Ray, which waits for the restart)."""
    expected = _outputs(_engine(checkpoint, None), PROMPTS)
    placement = initial_placement(list(range(1, 7)), 16, 2)
    pool = ExpertPool.start(checkpoint, placement, ShardResources(num_cpus=0.5))
    try:
        here = ray.get_runtime_context().get_node_id()
        nodes = ray.get([a.node_id.remote() for a in pool.actors])
        shard = nodes.index(here) if kind == "channel" else 1  # the shard the channel reaches
        victim = ray.get(pool.actors[shard].pid.remote())
        engine = _engine(checkpoint, ExpertDispatcher(_transport(pool, kind), placement, 16))
        killer = threading.Timer(0.3, lambda: os.kill(victim, signal.SIGKILL))
        killer.start()
        assert _outputs(engine, PROMPTS * 3) == expected * 3
        killer.join()
        assert ray.get(pool.actors[shard].pid.remote()) != victim  # it really died and came back
    finally:
        pool.shutdown()


def test_two_attention_replicas_share_one_pool(ray_cluster: object, checkpoint: Path) -> None:
    """Catches interference between attention replicas that share expert shards (M-to-N traffic):
    two engines, each with its own KV cache, run concurrently against one 2-shard pool."""
    expected = _outputs(_engine(checkpoint, None), PROMPTS)
    placement = initial_placement(list(range(1, 7)), 16, 2)
    pool = ExpertPool.start(checkpoint, placement, ShardResources(num_cpus=0.5))
    try:
        engines = [_engine(checkpoint, ExpertDispatcher(pool.transport(), placement, 16)) for _ in range(2)]
        results: list[list[list[int]]] = [[], []]

        def run(i: int) -> None:
            results[i] = _outputs(engines[i], PROMPTS)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [expected, expected]
    finally:
        pool.shutdown()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_hung_shard_fails_its_steps_in_bounded_time_and_the_engine_recovers(
    ray_cluster: object, checkpoint: Path, kind: str
) -> None:
    """Catches a stopped (hung, not dead) expert process making every request wait forever: with
    the shard SIGSTOPped, each request ends with an error within the call timeout; after SIGCONT the
    same engine serves the same prompts exactly again."""
    expected = _outputs(_engine(checkpoint, None), PROMPTS)
    placement = initial_placement(list(range(1, 7)), 16, 2)
    pool = ExpertPool.start(checkpoint, placement, ShardResources(num_cpus=0.5))
    try:
        here = ray.get_runtime_context().get_node_id()
        nodes = ray.get([a.node_id.remote() for a in pool.actors])
        shard = nodes.index(here) if kind == "channel" else 1
        victim = ray.get(pool.actors[shard].pid.remote())
        engine = _engine(checkpoint, ExpertDispatcher(_transport(pool, kind, 2.0), placement, 16))
        assert _outputs(engine, PROMPTS) == expected
        os.kill(victim, signal.SIGSTOP)
        try:
            params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            started = time.monotonic()
            out = engine.generate([GenerateRequest(f"h{i}", p, params) for i, p in enumerate(PROMPTS)])
            waited = time.monotonic() - started
            errors = [c.error for chunks in out.values() for c in chunks if c.error is not None]
            assert len(errors) == len(PROMPTS) and all("did not answer within 2.0 s" in e for e in errors)
            failed = [c for chunks in out.values() for c in chunks if c.error is not None]
            assert all(c.retry_after_s is not None for c in failed)  # transient: a 503, retriable
            assert waited < 60  # one failed step per request at most, not a wait for the shard
        finally:
            os.kill(victim, signal.SIGCONT)
        assert _outputs(engine, PROMPTS) == expected
        assert ray.get(pool.actors[shard].pid.remote()) == victim  # the same process, resumed
    finally:
        pool.shutdown()


def test_fp8_checkpoint_stays_fp8_in_shard_actors_unless_told_not_to(
    ray_cluster: object, tmp_path: Path
) -> None:
    """Catches `experts.keep_fp8` (ShardResources.keep_fp8) not reaching the shard processes, and
    FP8 shard actors computing differently from dequantized ones."""
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [24, 48], "ignored_layers": []}
    write_random_checkpoint(
        tmp_path, random_config_dict(max_position_embeddings=512), quantization_config=fp8
    )
    placement = initial_placement(list(range(1, 7)), 16, 2)
    sizes, outputs = {}, {}
    for keep in (True, False):
        pool = ExpertPool.start(tmp_path, placement, ShardResources(num_cpus=0.5, keep_fp8=keep))
        try:
            sizes[keep] = sum(ray.get([a.weight_bytes.remote() for a in pool.actors]))
            outputs[keep] = _outputs(
                _engine(tmp_path, ExpertDispatcher(pool.transport(), placement, 16)), PROMPTS
            )
        finally:
            pool.shutdown()
    assert sizes[False] >= 3.5 * sizes[True]  # fp32 dequantized: 4 bytes a weight against ~1
    assert outputs[True] == outputs[False]
