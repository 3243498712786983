"""Which expert shard holds which (layer, expert), with redundant copies of hot experts (EPLB).

Pure logic, no torch or ray. Every MoE layer is one dispatch round, so the cost of a layer is its
hottest shard: placement balances load per layer. `rebalance` turns a moving-average load per
(layer, expert) into a new placement: it gives the extra copies to the experts with the highest
load per copy, then packs copies onto shards heaviest-first (longest-processing-time rule), each
shard holding the same number of experts per layer (memory stays balanced) and never two copies of
one expert.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class ExpertPlacement:
    num_shards: int
    copies: Mapping[ExpertKey, tuple[int, ...]]  # shards holding each (layer, expert), >= 1 each

    def shards_of(self, layer: int, expert: int) -> tuple[int, ...]:
        return self.copies[(layer, expert)]

    def experts_of_shard(self, shard: int) -> list[ExpertKey]:
        return sorted(key for key, shards in self.copies.items() if shard in shards)

    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.copies})


def slots_per_shard(num_experts: int, num_redundant: int, num_shards: int) -> int:
    """Experts each shard holds per layer: all copies spread evenly (rounded up)."""
    return -(-(num_experts + num_redundant) // num_shards)


def initial_placement(moe_layers: Sequence[int], num_experts: int, num_shards: int) -> ExpertPlacement:
    """No load known yet: expert e of every layer on shard e % num_shards, one copy each."""
    if num_shards < 1 or num_shards > num_experts:
        raise ValueError(f"num_shards must be in [1, {num_experts}], got {num_shards}")
    return ExpertPlacement(
        num_shards, {(layer, e): (e % num_shards,) for layer in moe_layers for e in range(num_experts)}
    )


def rebalance(
    load: Mapping[ExpertKey, float], moe_layers: Sequence[int], num_experts: int, num_shards: int,
    num_redundant: int,
) -> ExpertPlacement:  # fmt: skip
    """A placement with `num_redundant` extra copies per layer minimising each layer's hottest shard."""
    slots = slots_per_shard(num_experts, num_redundant, num_shards)
    if num_redundant < 0 or num_redundant > num_experts * (num_shards - 1):
        raise ValueError(
            f"num_redundant must be in [0, {num_experts * (num_shards - 1)}], got {num_redundant}"
        )
    copies: dict[ExpertKey, tuple[int, ...]] = {}
    for layer in moe_layers:
        layer_load = [max(0.0, float(load.get((layer, e), 0.0))) for e in range(num_experts)]
        num_copies = _copies_per_expert(layer_load, num_redundant, num_shards)
        for e, shards in enumerate(_pack(layer_load, num_copies, num_shards, slots)):
            copies[(layer, e)] = shards
    return ExpertPlacement(num_shards, copies)


def _copies_per_expert(layer_load: list[float], num_redundant: int, num_shards: int) -> list[int]:
    """Each extra copy goes to the expert with the highest load per copy (at most one per shard)."""
    counts = [1] * len(layer_load)
    heap = [(-w, e) for e, w in enumerate(layer_load)]
    heapq.heapify(heap)
    for _ in range(num_redundant):
        while True:
            _, e = heapq.heappop(heap)
            if counts[e] < num_shards:
                break
        counts[e] += 1
        heapq.heappush(heap, (-layer_load[e] / counts[e], e))
    return counts


def _pack(
    layer_load: list[float], num_copies: list[int], num_shards: int, slots: int
) -> list[tuple[int, ...]]:
    """Longest-processing-time packing of copies (load split evenly among an expert's copies)."""
    items = sorted(
        ((layer_load[e] / num_copies[e], e) for e in range(len(layer_load)) for _ in range(num_copies[e])),
        key=lambda it: (-it[0], it[1]),
    )
    shard_load = [0.0] * num_shards
    shard_used = [0] * num_shards
    holders: list[list[int]] = [[] for _ in layer_load]
    for weight, e in items:
        candidates = [s for s in range(num_shards) if shard_used[s] < slots and s not in holders[e]]
        assert candidates, "placement infeasible: too few slots for the copies"
        best = min(candidates, key=lambda s: (shard_load[s], shard_used[s], s))
        holders[e].append(best)
        shard_load[best] += weight
        shard_used[best] += 1
    return [tuple(sorted(h)) for h in holders]


def shard_loads(placement: ExpertPlacement, load: Mapping[ExpertKey, float], layer: int) -> list[float]:
    """Expected load per shard in `layer` when each expert's tokens split evenly over its copies."""
    out = [0.0] * placement.num_shards
    for (lay, e), shards in placement.copies.items():
        if lay == layer:
            for s in shards:
                out[s] += load.get((lay, e), 0.0) / len(shards)
    return out


def balancedness(placement: ExpertPlacement, load: Mapping[ExpertKey, float]) -> float:
    """Mean over layers of mean/max shard load (1.0 = perfectly balanced), as SGLang reports it."""
    values = []
    for layer in placement.layers():
        loads = shard_loads(placement, load, layer)
        if max(loads) > 0:
            values.append(sum(loads) / len(loads) / max(loads))
    return sum(values) / len(values) if values else 1.0


class LoadTracker:
    """Exponential moving average of tokens per (layer, expert) from shards' periodic counts."""

    def __init__(self, decay: float = 0.8) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.load: dict[ExpertKey, float] = {}

    def update(self, counts: Mapping[ExpertKey, int]) -> None:
        for key in set(self.load) | set(counts):
            self.load[key] = self.decay * self.load.get(key, 0.0) + (1 - self.decay) * counts.get(key, 0)
