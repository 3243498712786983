"""The expert pool on Ray: one actor per expert shard, placed by a placement group over the nodes.

Each actor loads only its (layer, expert) weights. Actors restart when their process dies
(`max_restarts`) and Ray retries the in-flight `compute` call on the restarted actor
(`max_task_retries`), so a killed shard costs a step's latency, never a request. Attention replicas
call the actors through `transport_ray.RayTransport`. Ray's compiled graphs and shared-memory
channels are not used (no M-to-N sharing or restart-and-retry; idle readers spin a core: see
`benchmarks/NOTES.md`).
Shard actors run as batch workers (`cpu_policy.py`): on cores shared with attention replicas a
woken shard waits for the dispatcher's fan-out to finish instead of preempting it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mimo.device import device_for_gpus
from replicas.experts.channel_server import ChannelAddress, ChannelServer
from replicas.experts.cpu_policy import run_as_batch_worker
from replicas.experts.dispatch import ExpertDispatcher
from replicas.experts.expert_placement import ExpertKey, ExpertPlacement
from replicas.experts.expert_shard import ExpertShard, ShardStats
from replicas.experts.transport_channel import ChannelTransport
from replicas.experts.transport_ray import DEFAULT_CALL_TIMEOUT_S, RayTransport
from replicas.experts.wire import unpack

# Zero-copy torch tensors through the object store; idle OpenMP threads sleep rather than spin.
WORKER_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


class ExpertShardActor:
    """Ray actor body (wrapped with ray.remote by `ExpertPool`)."""

    def __init__(self, path: str, keys: list[ExpertKey], dtype: str, resources: ShardResources) -> None:
        torch.set_num_threads(resources.threads)
        run_as_batch_worker()  # a woken shard does not preempt the attention replica's fan-out
        self.path = path
        self.dtype = getattr(torch, dtype)
        self.device = device_for_gpus(resources.num_gpus)
        self.keep_fp8 = resources.keep_fp8
        self.shard = ExpertShard.load(path, keys, self.dtype, self.device, keep_fp8=self.keep_fp8)
        # calls from several attention replicas (or two ping-pong micro-batches) arrive on the
        # actor's threads: one compute at a time keeps the shard's load counters exact
        self.lock = threading.Lock()
        self.channel: ChannelServer | None = None

    def compute_packed(self, layer: int, payload: np.ndarray) -> np.ndarray:
        """payload [R, H + 2k] fp32 (`wire.pack`) -> partial output [R, H] fp32."""
        body = torch.from_numpy(payload if payload.flags.writeable else payload.copy())
        result: np.ndarray = self._compute_rows(layer, *unpack(body, self.shard.config.hidden_size)).numpy()
        return result

    def open_channel(self) -> ChannelAddress:
        """This shard's same-node channel (`channel_server.py`), started on first use."""
        if self.channel is None:
            config = self.shard.config
            self.channel = ChannelServer(self._compute_rows, config.hidden_size, config.num_experts_per_tok)
        return ChannelAddress(self.node_id(), self.channel.path)

    def _compute_rows(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Host rows -> host fp32 partial output, one compute at a time (Ray calls and channel
        connections arrive on different threads)."""
        with self.lock:
            out = self.shard.compute(layer, x.to(self.device), ids.to(self.device), weights.to(self.device))
        return out.float().cpu()

    def keys(self) -> list[ExpertKey]:
        return self.shard.keys

    def drain_stats(self) -> ShardStats:
        with self.lock:
            return self.shard.drain_stats()

    def prepare(self, keys: list[ExpertKey]) -> int:
        """EPLB step 1, beside live traffic: load the experts of the new placement that are not held
        yet and swap in a shard holding old + new (old-map traffic keeps working); returns #loaded."""
        old = self.shard
        missing = sorted(set(keys) - set(old.keys))
        if missing:
            union = sorted(set(old.keys) | set(keys))
            merged = ExpertShard.load(self.path, union, self.dtype, self.device, keep_fp8=self.keep_fp8)
            self.shard = merged  # one reference assignment: a compute in flight keeps its shard
        return len(missing)

    def finalize(self, keys: list[ExpertKey]) -> None:
        """EPLB step 3, after every dispatcher switched: drop experts the new placement moved away."""
        self.shard = self.shard.subset(keys)

    def weight_bytes(self) -> int:
        """Resident bytes of this shard's expert weights (`ExpertShard.weight_bytes`)."""
        return self.shard.weight_bytes

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())


@dataclass(frozen=True)
class ShardResources:
    """What each shard process gets: its CPUs, GPUs and torch threads, and whether the experts of an
    FP8 checkpoint stay FP8 in its memory (`expert_shard.ExpertShard.load`'s keep_fp8)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 1
    keep_fp8: bool = True


class ExpertPool:
    def __init__(self, actors: list[Any], group: PlacementGroup) -> None:
        self.actors = actors
        self.group = group
        self.is_shut_down = False

    @staticmethod
    def start(
        path: str | Path,
        placement: ExpertPlacement,
        resources: ShardResources = ShardResources(),
        strategy: str = "SPREAD",
        dtype: str = "float32",
    ) -> ExpertPool:
        bundles = [{"CPU": resources.num_cpus, **({"GPU": resources.num_gpus} if resources.num_gpus else {})}]
        group = placement_group(bundles * placement.num_shards, strategy=strategy)
        ray.get(group.ready())
        actors = [
            start_shard(path, placement.experts_of_shard(s), resources, dtype, group, s)
            for s in range(placement.num_shards)
        ]
        ray.get([a.pid.remote() for a in actors])
        return ExpertPool(actors, group)

    def restart_in_bundle(
        self, bundle: int, path: str | Path, keys: list[ExpertKey], resources: ShardResources, dtype: str
    ) -> Any:
        """A new shard actor holding `keys` in this pool's bundle `bundle` (one whose actor a shrink
        killed); it is shut down with the pool."""
        actor = start_shard(path, keys, resources, dtype, self.group, bundle)
        self.actors[bundle] = actor
        return actor

    def transport(self, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> RayTransport:
        return RayTransport(self.actors, call_timeout_s)

    def channel_transport(self, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> ChannelTransport:
        """Same-node shards over their channel, the others over Ray (`transport_channel.py`)."""
        return ChannelTransport(self.actors, call_timeout_s)

    def move_to(self, placement: ExpertPlacement, dispatchers: list[ExpertDispatcher]) -> int:
        """Moves the pool to `placement` while traffic runs, with dispatchers in this process (the
        three steps of `replicas.experts.placement_switch`). Returns experts loaded."""
        from replicas.experts.placement_switch import finalize_calls, prepare_calls, switch_in_process

        loaded = sum(ray.get(prepare_calls(self.actors, placement)))
        switch_in_process(dispatchers, placement)
        ray.get(finalize_calls(self.actors, placement))
        return int(loaded)

    def drain_stats(self) -> list[ShardStats]:
        return list(ray.get([a.drain_stats.remote() for a in self.actors]))

    def shutdown(self) -> None:
        """Kills the shards and frees the group's reservation (a second call does nothing)."""
        if self.is_shut_down:
            return
        self.is_shut_down = True
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)


def start_shard(
    path: str | Path,
    keys: list[ExpertKey],
    resources: ShardResources,
    dtype: str,
    group: PlacementGroup,
    bundle: int,
) -> Any:
    """One shard actor holding `keys`, in bundle `bundle` of `group` (a bundle whose actor was killed
    takes a new one); Ray restarts it there when its process dies."""
    return (
        ray.remote(ExpertShardActor)
        .options(
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=2,  # EPLB loads run beside compute calls
            runtime_env={"env_vars": WORKER_ENV},
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle),
        )
        .remote(str(path), keys, dtype, resources)
    )
