"""The `ExpertPool` Serve deployment: owns the expert shard actors (a placement group spread over
nodes; Ray restarts a dead shard and retries its call), measures their load (tokens per (layer,
expert) and per shard, busy time, balancedness) and changes the pool live, with one protocol for
EPLB and for autoscaling the number of shards: load the new placement beside traffic (new shards
start with their experts), publish it as a new version, wait until every live attention replica
routes by it, then drop what moved away (and shards no longer used). Attention replicas call the
shard actors directly (no Serve hop on the hot path) and `sync` with the pool once per report
period, which is also their acknowledgement. Shards added beyond the first placement group's size
get a placement group of their own, so removing one frees its reservation. The first group's
bundles stay reserved when the pool shrinks below it, and growing back starts shards in those
bundles again: the pool never reserves more than max(first size, current size) shards."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from cluster.autoscaling import ExpertSnapshot, PoolState, decide_experts
from cluster.serving.autoscaling_policy import scaling_config
from cluster.serving.metrics_ray import ray_metrics
from cluster.spec import ClusterSpec

if TYPE_CHECKING:  # the replicas package (torch) loads in the deployment's process, not at import
    from replicas.experts.expert_placement import ExpertPlacement
    from replicas.experts.placement_switch import PlacementUpdate

STATS_PERIOD_S = 2.0
LIVE_REPLICA_S = 10.0  # an attention replica not heard from for this long no longer holds a switch
SWITCH_TIMEOUT_S = 30.0
FINALIZE_GRACE_S = 1.0  # a layer call that read the old table just before the switch ends by then


class ExpertPoolDeployment:
    def __init__(self, spec: ClusterSpec) -> None:
        from mimo.config import MiMoConfig
        from replicas.experts.expert_placement import LoadTracker, initial_placement
        from replicas.experts.expert_pool import ExpertPool, ShardResources

        self.spec = spec
        config = MiMoConfig.from_file(f"{self.spec.model.path}/config.json")
        self.moe_layers = [i for i, is_moe in enumerate(config.is_moe_layer) if is_moe]
        self.num_experts = config.num_experts
        self.placement = initial_placement(self.moe_layers, config.num_experts, self.spec.experts.num_shards)
        # Shard actors fate-share with this replica: when it is lost (its node died), Serve starts a
        # new one with new shards. Starting at a version no earlier pool used makes every attention
        # replica's next sync hand it those shards; from 0 each would keep calling the dead ones.
        self.version = time.time_ns()
        x = self.spec.experts
        self.pool = ExpertPool.start(
            self.spec.model.path,
            self.placement,
            ShardResources(x.num_cpus, x.num_gpus, x.threads, x.keep_fp8),
            x.placement_strategy,
            self.spec.model.dtype,
        )
        self.actors: list[Any] = list(self.pool.actors)
        self.added: dict[int, Any] = {}  # shard index -> its own one-shard ExpertPool
        self.metrics = ray_metrics()
        self.tracker = LoadTracker()
        self.scaling = scaling_config(self.spec)
        self.scale_state = PoolState()
        self._change = asyncio.Lock()  # one placement change (EPLB or resize) at a time
        self.seen: dict[str, tuple[int, float]] = {}  # attention replica -> (version it routes by, when)
        self._stats_task: asyncio.Task[None] | None = None
        self._last_rebalance_s = time.monotonic()

    async def current(self) -> PlacementUpdate:
        """The placement an attention replica starts with."""
        self._start_stats()
        return self._update()

    async def sync(self, replica_id: str, version: int) -> PlacementUpdate | None:
        """Called by each attention replica with the placement version it routes by (its
        acknowledgement); returns a newer placement to switch to, or None."""
        self.seen[replica_id] = (version, time.monotonic())
        return None if version == self.version else self._update()

    def _update(self) -> PlacementUpdate:
        from replicas.experts.placement_switch import PlacementUpdate

        return PlacementUpdate(self.version, self.placement, tuple(self.actors), self.num_experts)

    async def is_ready(self) -> bool:
        self._start_stats()
        try:
            await asyncio.wait_for(asyncio.gather(*(a.pid.remote() for a in self.actors)), timeout=5)
            return True
        except Exception:  # a shard being restarted is not ready
            return False

    def _start_stats(self) -> None:
        if self._stats_task is None:
            self._stats_task = asyncio.get_running_loop().create_task(self._stats_loop())

    async def _stats_loop(self) -> None:
        from replicas.experts.expert_placement import balancedness

        last = time.monotonic()
        while True:
            await asyncio.sleep(STATS_PERIOD_S)
            try:
                stats = await asyncio.gather(*(a.drain_stats.remote() for a in self.actors))
            except Exception:  # a shard restarting: its counts since the last drain are lost, not the pool
                continue
            now = time.monotonic()
            elapsed, last = now - last, now
            counts: dict[tuple[int, int], int] = defaultdict(int)
            busy = []
            for shard, s in enumerate(stats):  # replicas.experts.expert_shard.ShardStats
                shard_counts = s.token_counts
                for key, n in shard_counts.items():
                    counts[key] += n
                busy.append(min(1.0, s.compute_s / elapsed))
                self.metrics.shard_load(
                    shard=shard, num_tokens=sum(shard_counts.values()), busy_ratio=busy[-1]
                )
            self.metrics.expert_tokens(counts)
            self.tracker.update(counts)
            self.metrics.eplb(balancedness(self.placement, self.tracker.load))
            await self._autoscale(sum(busy) / len(busy))
            interval = self.spec.experts.eplb_interval_s
            if interval > 0 and now - self._last_rebalance_s >= interval and self.tracker.load:
                self._last_rebalance_s = now
                await self._rebalance()

    async def _autoscale(self, busy_ratio: float) -> None:
        now = time.time()
        current = len(self.actors)
        decision = decide_experts(
            ExpertSnapshot(now, busy_ratio), current, now, self.scaling, self.scale_state
        )
        self.scale_state = decision.state
        self.metrics.autoscaled(
            pool="experts", target=decision.target, previous=current, reason=decision.cause
        )
        if decision.target != current:
            await self._resize(decision.target)

    async def _rebalance(self) -> None:
        from replicas.experts.expert_placement import balancedness, rebalance

        load = dict(self.tracker.load)
        x = self.spec.experts
        n = len(self.actors)
        new = rebalance(
            load, self.moe_layers, self.num_experts, n, min(x.num_redundant, self.num_experts * (n - 1))
        )
        before, after = balancedness(self.placement, load), balancedness(new, load)
        if after - before >= x.eplb_min_gain and await self._switch(new, self.actors):
            self.metrics.eplb(after, rebalanced=True)

    async def _resize(self, n: int) -> None:
        """Grows or shrinks the pool to `n` shards with a placement balanced for the measured load."""
        from replicas.experts.expert_placement import ExpertPlacement, initial_placement, rebalance
        from replicas.experts.expert_pool import ExpertPool, ShardResources

        x, old_actors = self.spec.experts, list(self.actors)
        current = len(old_actors)
        load = dict(self.tracker.load)
        redundant = min(x.num_redundant, self.num_experts * (n - 1))
        new = (
            rebalance(load, self.moe_layers, self.num_experts, n, redundant)
            if load
            else initial_placement(self.moe_layers, self.num_experts, n)
        )
        actors = old_actors[:n]
        resources = ShardResources(x.num_cpus, x.num_gpus, x.threads, x.keep_fp8)
        for shard in range(current, n):  # new shards start holding their experts
            keys = new.experts_of_shard(shard)
            if shard < len(self.pool.actors):  # the first group's bundle, freed by a shrink
                actor = self.pool.restart_in_bundle(
                    shard, self.spec.model.path, keys, resources, self.spec.model.dtype
                )
                await actor.pid.remote()
                actors.append(actor)
                continue
            one = ExpertPlacement(1, {key: (0,) for key in keys})
            pool = await asyncio.to_thread(
                ExpertPool.start,
                self.spec.model.path,
                one,
                resources,
                x.placement_strategy,
                self.spec.model.dtype,
            )
            self.added[shard] = pool
            actors.extend(pool.actors)
        if await self._switch(new, actors):
            for shard in range(n, current):  # no longer in any live replica's table
                pool = self.added.pop(shard, None)
                if pool is not None:
                    await asyncio.to_thread(pool.shutdown)
                else:
                    import ray

                    ray.kill(old_actors[shard])

    async def _switch(self, new: ExpertPlacement, actors: list[Any]) -> bool:
        """The pool's side of `replicas.experts.placement_switch`: loads `new` on `actors` beside traffic,
        publishes it, waits for every live attention replica to route by it, then drops what moved
        away. False (nothing dropped) on a timeout."""
        from replicas.experts.placement_switch import finalize_calls, prepare_calls

        async with self._change:
            await asyncio.gather(*prepare_calls(actors, new))
            self.placement, self.actors, self.version = new, actors, self.version + 1
            deadline = time.monotonic() + SWITCH_TIMEOUT_S
            while time.monotonic() < deadline and self._lagging():
                await asyncio.sleep(0.2)
            if self._lagging():  # keep old + new loaded: a lagging replica still finds its experts
                return False
            await asyncio.sleep(FINALIZE_GRACE_S)
            await asyncio.gather(*finalize_calls(actors, new))
            return True

    def _lagging(self) -> bool:
        now = time.monotonic()
        return any(v != self.version and now - t < LIVE_REPLICA_S for v, t in self.seen.values())

    def __del__(self) -> None:
        for pool in [getattr(self, "pool", None), *getattr(self, "added", {}).values()]:
            if pool is not None:
                pool.shutdown()
