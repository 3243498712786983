"""In-process expert transport: shards are plain objects in this process (default run, tests).

It is the reference every other transport must match: the same shards, called in message order.
"""

from __future__ import annotations

import torch

from replicas.experts.dispatch import ExpertTransport, ShardMessage
from replicas.experts.expert_shard import ExpertShard


class InProcessTransport(ExpertTransport):
    def __init__(self, shards: list[ExpertShard]) -> None:
        self.shards = shards

    def send(self, layer: int, messages: list[ShardMessage]) -> object:
        return [self.shards[m.shard].compute(layer, m.x, m.expert_ids, m.weights) for m in messages]

    def wait(self, handle: object) -> list[torch.Tensor]:
        assert isinstance(handle, list)
        return handle
