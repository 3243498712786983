"""Expert transport over Ray actor calls: one async call per destination shard per MoE layer, each
carrying one packed fp32 numpy array (`wire.py`; numpy crosses the object store zero-copy). The
simplest transport and the fault-tolerant one: a restarted shard actor retries the call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from replicas.experts.dispatch import ExpertTransport, ShardMessage
from replicas.experts.wire import pack


class RayTransport(ExpertTransport):
    is_async = True  # actor calls return futures; shards compute while the caller runs on

    def __init__(self, actors: Sequence[Any]) -> None:
        self._actors = list(actors)

    def use_actors(self, actors: Sequence[Any]) -> None:
        """The pool's new shard list (a placement switch): grows before the table that uses new
        shards; ids past the new list keep their old handles, which no new table names (a call in
        flight may still)."""
        self._actors = list(actors) + self._actors[len(actors) :]

    def send(self, layer: int, messages: list[ShardMessage]) -> object:
        return [
            self._actors[m.shard].compute_packed.remote(layer, pack(m.x, m.expert_ids, m.weights).numpy())
            for m in messages
        ]

    def wait(self, handle: object) -> list[torch.Tensor]:
        assert isinstance(handle, list)
        arrays: list[np.ndarray] = ray.get(handle)
        # results come back as read-only views of the object store: copy (small) before torch uses them
        return [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]
