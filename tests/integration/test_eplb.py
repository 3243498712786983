"""EPLB on live Ray shards: under skewed routing, a rebalance with 25% redundant experts moves
weights while requests keep running, outputs never change, and shard load evens out."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from replicas.experts.dispatch import ExpertDispatcher
from replicas.experts.expert_placement import ExpertKey, LoadTracker, initial_placement, rebalance
from replicas.experts.expert_pool import ExpertPool, ShardResources
from replicas.experts.expert_shard import ShardStats
from tests.factory import random_config_dict, random_model
from tests.integration.test_expert_pool import PROMPTS, _engine, _outputs

pytestmark = pytest.mark.integration
HOT = (0, 4, 8, 12)  # all on shard 0 under the initial e % 4 placement


def _skewed_checkpoint(path: Path) -> None:
    import json

    from mimo.checkpoint import write_checkpoint
    from mimo.config import MiMoConfig
    from mimo.config_export import to_hub_dict
    from mimo.weights import hub_state_from_model

    config = MiMoConfig.from_hub_dict(random_config_dict(max_position_embeddings=512))
    model = random_model(config, seed=4)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            bias = torch.zeros(16)
            bias[list(HOT)] = 5.0  # these four win top-4 for nearly every token
            layer.mlp.gate.e_score_correction_bias.copy_(bias)
    write_checkpoint(path, hub_state_from_model(model))
    (path / "config.json").write_text(json.dumps(to_hub_dict(config)))


def _shard_loads(stats: list[ShardStats], layer: int) -> list[int]:
    loads = []
    for s in stats:
        counts = s.token_counts
        loads.append(sum(n for (lay, _), n in counts.items() if lay == layer))
    return loads


def test_rebalance_under_traffic(ray_cluster: object, tmp_path: Path) -> None:
    """Catches a stop-the-world or lossy EPLB move (outputs change, requests fail) and a rebalance
    that does not even out the hottest shard (max/mean must reach <= 1.2 with 4 of 16 redundant)."""
    _skewed_checkpoint(tmp_path)
    expected = _outputs(_engine(tmp_path, None), PROMPTS)
    moe_layers = list(range(1, 7))
    placement = initial_placement(moe_layers, 16, 4)
    pool = ExpertPool.start(tmp_path, placement, ShardResources(num_cpus=0.5))
    try:
        dispatcher = ExpertDispatcher(pool.transport(), placement, 16)
        engine = _engine(tmp_path, dispatcher)
        assert _outputs(engine, PROMPTS) == expected
        stats = pool.drain_stats()
        before = _shard_loads(stats, 1)
        merged: dict[ExpertKey, int] = {}
        for s in stats:
            merged.update(s.token_counts)
        tracker = LoadTracker(decay=0.0)
        tracker.update(merged)
        new = rebalance(tracker.load, moe_layers, 16, 4, num_redundant=4)

        failures: list[str] = []

        def traffic() -> None:
            for _ in range(3):
                if _outputs(engine, PROMPTS) != expected:
                    failures.append("output changed during the move")

        thread = threading.Thread(target=traffic)
        thread.start()
        loaded = pool.move_to(new, [dispatcher])
        thread.join()
        assert failures == [] and loaded > 0
        pool.drain_stats()
        assert _outputs(engine, PROMPTS) == expected
        after = _shard_loads(pool.drain_stats(), 1)
        ratio_before = max(before) / (sum(before) / 4)
        ratio_after = max(after) / (sum(after) / 4)
        assert ratio_before > 2.0
        assert ratio_after <= 1.2, (before, after)
        print(f"max/mean shard load, layer 1: before {ratio_before:.2f}, after {ratio_after:.2f}")
    finally:
        pool.shutdown()
