"""Expert shards and dispatch (in process): shards load only their experts, one message per shard
per layer, redundant copies split the load, and the combined output equals the model's MoE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimo.moe import MoE
from replicas.experts.dispatch import HOST_ROUTING_MAX_PAIRS, ExpertDispatcher
from replicas.experts.expert_placement import initial_placement, rebalance
from replicas.experts.expert_shard import ExpertShard
from replicas.experts.transport_local import InProcessTransport
from tests.factory import random_config_dict, write_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("ckpt")
    return path, write_random_checkpoint(path, random_config_dict())


@pytest.mark.parametrize("num_rows", [37, 300])  # routed on the host / on the device
@pytest.mark.parametrize(("num_shards", "num_redundant"), [(1, 0), (2, 0), (4, 0), (4, 4)])
def test_dispatched_moe_equals_in_model(
    checkpoint: tuple[Path, torch.nn.Module], num_shards: int, num_redundant: int, num_rows: int
) -> None:
    """Catches rows sent to the wrong shard, a pair computed twice by two copies, or a lost pair."""
    path, model = checkpoint
    config = model.config
    moe_layers = [i for i, m in enumerate(config.is_moe_layer) if m]
    gen = torch.Generator().manual_seed(0)
    skewed = {
        (layer, e): float(torch.rand(1, generator=gen)) * (10 if e < 2 else 1)
        for layer in moe_layers
        for e in range(16)
    }
    placement = (
        rebalance(skewed, moe_layers, 16, num_shards, num_redundant)
        if num_redundant
        else initial_placement(moe_layers, 16, num_shards)
    )
    shards = [ExpertShard.load(path, placement.experts_of_shard(s)) for s in range(num_shards)]
    for s, shard in enumerate(shards):
        assert shard.keys == placement.experts_of_shard(s)
    dispatcher = ExpertDispatcher(InProcessTransport(shards), placement, 16)
    x = torch.randn(num_rows, config.hidden_size, generator=gen)
    assert (num_rows * config.num_experts_per_tok <= HOST_ROUTING_MAX_PAIRS) == (num_rows == 37)
    for layer in moe_layers:
        moe = model.model.layers[layer].mlp
        assert isinstance(moe, MoE)
        routing = moe.gate(x)
        messages = dispatcher.messages(layer, x, routing)
        assert len({m.shard for m in messages}) == len(messages) <= num_shards
        with torch.no_grad():
            torch.testing.assert_close(dispatcher.run(layer, x, routing), moe(x), rtol=0, atol=1e-5)
    if num_redundant:  # every copy of a replicated expert received tokens
        counts = [shard.drain_stats().token_counts for shard in shards]
        for (layer, e), holders in placement.copies.items():
            if len(holders) > 1 and layer == moe_layers[0]:
                got = [counts[s].get((layer, e), 0) for s in holders]  # type: ignore[union-attr]
                if sum(got) >= 2 * len(holders):
                    assert all(g > 0 for g in got)


def test_switch_waits_for_calls_routed_by_the_old_table(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    """Catches EPLB dropping experts while a layer call routed by the old table is still in flight
    (it would reach a shard that no longer holds its experts)."""
    path, model = checkpoint
    moe_layers = [i for i, m in enumerate(model.config.is_moe_layer) if m]
    placement = initial_placement(moe_layers, 16, 2)
    shards = [ExpertShard.load(path, placement.experts_of_shard(s)) for s in range(2)]
    dispatcher = ExpertDispatcher(InProcessTransport(shards), placement, 16)
    x = torch.randn(5, model.config.hidden_size)
    moe = model.model.layers[moe_layers[0]].mlp
    assert isinstance(moe, MoE)
    pending = dispatcher.submit(moe_layers[0], x, moe.gate(x))  # routed by generation 0
    dispatcher.set_placement(initial_placement(moe_layers, 16, 2))
    assert dispatcher.wait_for_old_calls(timeout_s=0.05) is False
    dispatcher.collect(pending, x)
    assert dispatcher.wait_for_old_calls(timeout_s=0.05) is True
    later = dispatcher.submit(moe_layers[0], x, moe.gate(x))  # a new-table call never blocks a switch
    assert dispatcher.wait_for_old_calls(timeout_s=0.05) is True
    dispatcher.collect(later, x)


def test_host_routing_assigns_pairs_exactly_as_device_routing(
    checkpoint: tuple[Path, torch.nn.Module],
) -> None:
    """Catches the host path (small calls) sending a pair to another copy than the device path would:
    same shards, rows, masked ids and weights, with redundant copies splitting hot experts."""
    _path, model = checkpoint
    moe_layers = [i for i, m in enumerate(model.config.is_moe_layer) if m]
    hot = {(layer, e): 10.0 if e < 3 else 1.0 for layer in moe_layers for e in range(16)}
    placement = rebalance(hot, moe_layers, 16, 4, 6)
    dispatcher = ExpertDispatcher(InProcessTransport([]), placement, 16)
    table = dispatcher._tables[moe_layers[0]]
    moe = model.model.layers[moe_layers[0]].mlp
    assert isinstance(moe, MoE)
    gen = torch.Generator().manual_seed(1)
    for num_rows in (1, 2, 9, 40):
        x = torch.randn(num_rows, model.config.hidden_size, generator=gen)
        routing = moe.gate(x)
        host = dispatcher._messages_on_host(table, x, routing)
        device = dispatcher._messages_on_device(table, x, routing)
        assert [m.shard for m in host] == [m.shard for m in device]
        for h, d in zip(host, device, strict=True):
            assert h.rows.tolist() == d.rows.tolist()
            assert h.expert_ids.tolist() == d.expert_ids.tolist()
            assert torch.equal(h.x, d.x) and torch.equal(h.weights, d.weights)
