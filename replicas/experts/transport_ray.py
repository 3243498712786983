"""Expert transport over Ray actor calls: one async call per destination shard per MoE layer, each
carrying one packed fp32 numpy array (`wire.py`; numpy crosses the object store zero-copy). The
simplest transport and the fault-tolerant one: a restarted shard actor retries the call. A shard
that neither answers nor dies (a hung GPU, a stopped process) fails the layer after
`call_timeout_s` (ExpertCallTimeout), so the engine step fails its requests with an error instead of
every request on every replica waiting forever; the timeout must outlast a shard's restart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from replicas.experts.dispatch import ExpertsUnavailable, ExpertTransport, ShardMessage
from replicas.experts.wire import pack

DEFAULT_CALL_TIMEOUT_S = 120.0  # a shard restart (new process, its experts loaded again) fits


class ExpertCallTimeout(ExpertsUnavailable):
    """An expert shard answered none of a layer's calls in time."""


class RayTransport(ExpertTransport):
    is_async = True  # actor calls return futures; shards compute while the caller runs on

    def __init__(self, actors: Sequence[Any], call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        self.actors = list(actors)
        self.call_timeout_s = call_timeout_s

    def use_actors(self, actors: Sequence[Any]) -> None:
        """The pool's new shard list (a placement switch): grows before the table that uses new
        shards; ids past the new list keep their old handles, which no new table names (a call in
        flight may still)."""
        self.actors = list(actors) + self.actors[len(actors) :]

    def send(self, layer: int, messages: list[ShardMessage]) -> object:
        return [
            self.actors[m.shard].compute_packed.remote(layer, pack(m.x, m.expert_ids, m.weights).numpy())
            for m in messages
        ]

    def wait(self, handle: object) -> list[torch.Tensor]:
        assert isinstance(handle, list)
        try:
            arrays: list[np.ndarray] = ray.get(handle, timeout=self.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            for ref in handle:
                ray.cancel(ref)  # a stopped shard that resumes skips what nobody waits for
            raise ExpertCallTimeout(
                f"an expert shard did not answer within {self.call_timeout_s} s"
            ) from None
        # the shard's actor died or is restarting (its node, its pool owner), or its result was lost
        # with its node; an error raised inside a shard's compute (RayTaskError) is not transient
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            raise ExpertsUnavailable(f"an expert shard failed: {type(e).__name__}") from e
        # results come back as read-only views of the object store: copy (small) before torch uses them
        return [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]
