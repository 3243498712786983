"""The collective (torch.distributed gloo) expert transport: shard processes on loopback serve one
message per MoE layer; greedy outputs through 2 and 4 shard processes equal the single-process run."""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path

import pytest

from mimo.config import MiMoConfig
from replicas.experts.dispatch import ExpertDispatcher
from replicas.experts.expert_placement import ExpertKey, initial_placement
from replicas.experts.transport_collective import CollectiveTransport, init_group
from tests.integration.test_expert_pool import PROMPTS, _engine, _outputs

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _shard_main(path: str, keys: list[ExpertKey], rank: int, world: int, port: int, hidden: int) -> None:
    import torch

    from replicas.experts.expert_shard import ExpertShard
    from replicas.experts.transport_collective import serve_shard

    torch.set_num_threads(1)
    shard = ExpertShard.load(path, keys)
    init_group(rank, world, "127.0.0.1", port)
    serve_shard(shard, hidden)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_collective_shards_match_single_process(tmp_path: Path, num_shards: int) -> None:
    """Catches payload packing errors (ids as floats, weights, row order), a desynchronised loop or
    buffer growth (prefill steps exceed the initial capacity), and ping-pong micro-batches whose two
    in-flight messages per shard get crossed."""
    from tests.factory import random_config_dict, write_random_checkpoint

    write_random_checkpoint(tmp_path, random_config_dict(max_position_embeddings=512))
    expected = _outputs(_engine(tmp_path, None), PROMPTS)
    config = MiMoConfig.from_file(tmp_path)
    placement = initial_placement(list(range(1, 7)), 16, num_shards)
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_shard_main,
            args=(
                str(tmp_path),
                placement.experts_of_shard(s),
                s + 1,
                num_shards + 1,
                port,
                config.hidden_size,
            ),
        )
        for s in range(num_shards)
    ]
    for p in procs:
        p.start()
    init_group(0, num_shards + 1, "127.0.0.1", port)
    transport = CollectiveTransport(num_shards, config.hidden_size)
    try:
        for ping_pong in (False, True):
            engine = _engine(tmp_path, ExpertDispatcher(transport, placement, 16, ping_pong=ping_pong))
            assert _outputs(engine, PROMPTS) == expected
    finally:
        transport.shutdown()
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
