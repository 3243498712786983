"""The live placement switch (EPLB moves, adding or removing shards), both of its sides in one place.

A new placement goes live without stopping traffic, in three steps:
1. pool side, `prepare_calls`: every shard loads the experts of the new placement beside the ones it
   holds (a shard then serves old and new tables alike);
2. replica side, `ReplicaSwitch.apply`: each attention replica takes the new shard handles, switches
   its dispatcher's table atomically between layer calls, and waits until no call routed by the old
   table is in flight; only then does it acknowledge the new version;
3. pool side, once every live replica acknowledged, `finalize_calls`: shards drop what moved away.
The pool publishes a `PlacementUpdate`; `cluster/serving/expert_pool_deployment.py` runs steps 1 and 3 and
hands updates out, `cluster/serving/attention_deployment.py` runs step 2, and `ExpertPool.move_to` runs all
three in one process for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from replicas.experts.dispatch import ExpertDispatcher
from replicas.experts.expert_placement import ExpertPlacement
from replicas.experts.transport_channel import ChannelTransport
from replicas.experts.transport_ray import RayTransport


@dataclass(frozen=True)
class PlacementUpdate:
    """The pool's current placement, as attention replicas receive it."""

    version: int  # grows by one per switch
    placement: ExpertPlacement
    actors: tuple[Any, ...]  # shard actor handles; index = shard id
    num_experts: int


def prepare_calls(actors: Sequence[Any], placement: ExpertPlacement) -> list[Any]:
    """Step 1: each shard loads what `placement` gives it beside what it holds (object refs of the
    number of experts each loaded)."""
    return [a.prepare.remote(placement.experts_of_shard(s)) for s, a in enumerate(actors)]


def finalize_calls(actors: Sequence[Any], placement: ExpertPlacement) -> list[Any]:
    """Step 3: each shard keeps only what `placement` gives it (object refs)."""
    return [a.finalize.remote(placement.experts_of_shard(s)) for s, a in enumerate(actors)]


class ReplicaSwitch:
    """Step 2 for one attention replica: its transport and dispatcher, and the version it routes by."""

    def __init__(
        self, transport: RayTransport | ChannelTransport, dispatcher: ExpertDispatcher, version: int
    ) -> None:
        self.transport = transport
        self.dispatcher = dispatcher
        self.version = version

    def apply(self, update: PlacementUpdate) -> bool:
        """Switches to `update` (blocking until old calls drain: run it off the event loop); True
        once this replica routes only by it, which its next sync acknowledges."""
        # the transport first: the new table may name shards the old list lacks
        self.transport.use_actors(update.actors)
        self.dispatcher.set_placement(update.placement)
        if not self.dispatcher.wait_for_old_calls():
            return False
        self.version = update.version
        return True


def switch_in_process(dispatchers: Sequence[ExpertDispatcher], placement: ExpertPlacement) -> None:
    """Step 2 for dispatchers in this process (tests, benchmarks); raises TimeoutError when a call
    by the old table does not end."""
    for dispatcher in dispatchers:
        dispatcher.set_placement(placement)
    for dispatcher in dispatchers:  # calls routed by the old table still need its experts
        if not dispatcher.wait_for_old_calls():
            raise TimeoutError("a dispatcher kept a call on the old placement for 30 s")
