"""Expert dispatch on the attention side: route rows to expert shards, one message per shard per
MoE layer, and combine the shards' weighted partial outputs.

A (token, expert) pair whose expert has several copies goes to copy `rank % copies`, where rank
counts that expert's pairs in this layer call, so hot experts' tokens split evenly over copies.
The placement table is swapped atomically (`set_placement`) while traffic runs: a call uses the
table it started with. Transports move the messages (`ExpertTransport`); every transport must give
the in-process result.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass

import torch

from mimo.moe import Routing
from replicas.experts.expert_placement import ExpertPlacement


@dataclass(frozen=True)
class ShardMessage:
    shard: int
    rows: torch.Tensor  # [R] indices into the layer's token rows
    x: torch.Tensor  # [R, H]
    expert_ids: torch.Tensor  # [R, k]; pairs assigned to other shards carry num_experts (NOT_HERE)
    weights: torch.Tensor  # [R, k]
    is_every_row: bool = False  # rows are all the layer call's rows, in order (nothing to scatter)


class ExpertsUnavailable(RuntimeError):
    """A layer's expert calls failed for a reason outside the request: a shard died, did not answer
    in time, or is being replaced. Transient: the engine fails the step's requests as retriable."""


class ExpertTransport(abc.ABC):
    """Moves one MoE layer's messages to shards and their partial outputs back."""

    # True when `send` returns before the shards finish (they run elsewhere), so the caller can
    # overlap other work (ping-pong micro-batches) with the experts' compute.
    is_async: bool = False

    @abc.abstractmethod
    def send(self, layer: int, messages: list[ShardMessage]) -> object:
        """Starts the layer's expert work; returns a handle for `wait`."""

    @abc.abstractmethod
    def wait(self, handle: object) -> list[torch.Tensor]:
        """Partial outputs [R, H], one per message, in message order."""


# Up to this many (token, expert) pairs a layer call is routed on the host from lists: a decode
# step then costs a few ops per shard instead of ~15 ops plus ~8 per shard on the device.
HOST_ROUTING_MAX_PAIRS = 256


@dataclass(frozen=True)
class _LayerTable:
    copy_shards: torch.Tensor  # [E, max_copies] shard ids (-1 padding)
    num_copies: torch.Tensor  # [E]
    copies: tuple[tuple[int, ...], ...]  # the same, as host lists: expert -> its shards


def layer_tables(placement: ExpertPlacement, num_experts: int) -> dict[int, _LayerTable]:
    tables = {}
    for layer in placement.layers():
        copies = [placement.shards_of(layer, e) for e in range(num_experts)]
        width = max(len(c) for c in copies)
        padded = [list(c) + [-1] * (width - len(c)) for c in copies]
        tables[layer] = _LayerTable(
            torch.tensor(padded), torch.tensor([len(c) for c in copies]), tuple(tuple(c) for c in copies)
        )
    return tables


@dataclass(frozen=True)
class Pending:
    handle: object
    messages: list[ShardMessage]
    num_rows: int
    generation: int = 0  # the placement table's generation the call was routed by


class ExpertDispatcher:
    def __init__(
        self,
        transport: ExpertTransport,
        placement: ExpertPlacement,
        num_experts: int,
        ping_pong: bool = False,  # see `use_ping_pong`
    ) -> None:
        self.transport = transport
        self.num_experts = num_experts
        self.ping_pong = ping_pong
        self.placement = placement
        self._tables = layer_tables(placement, num_experts)
        self._generation = 0  # bumped by every switch
        self._in_flight: dict[int, int] = {}  # generation -> layer calls submitted, not yet collected
        self._idle = threading.Condition()

    def use_ping_pong(self, num_seqs: int) -> bool:
        """Split a step into two micro-batches (MegaScale-Infer ping-pong)? Needs two sequences.
        Off unless asked for: on 2-core hosts the shards share the caller's cores, so there is
        nothing to overlap onto, and the second message per shard per layer made decode 0.5-0.9x
        as fast (benchmarks/results/expert_dispatch.json). Turn it on where shards have their own
        cores or GPUs."""
        return self.ping_pong and num_seqs >= 2

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Atomic switch: later calls route by the new table; the shards must already hold it.
        Calls already submitted finish by the old one: `wait_for_old_calls` before dropping it."""
        tables = layer_tables(placement, self.num_experts)
        with self._idle:
            self.placement, self._tables = placement, tables
            self._generation += 1

    def wait_for_old_calls(self, timeout_s: float = 30.0) -> bool:
        """Blocks until no layer call routed by a table older than the current one is in flight
        (then the shards may drop experts the old table used); False on timeout."""
        with self._idle:
            return self._idle.wait_for(
                lambda: not any(n for g, n in self._in_flight.items() if g < self._generation), timeout_s
            )

    def messages(self, layer: int, x: torch.Tensor, routing: Routing) -> list[ShardMessage]:
        return self._messages(self._tables[layer], x, routing)

    def _messages(self, table: _LayerTable, x: torch.Tensor, routing: Routing) -> list[ShardMessage]:
        if routing.expert_ids.numel() <= HOST_ROUTING_MAX_PAIRS:
            return self._messages_on_host(table, x, routing)
        return self._messages_on_device(table, x, routing)

    def _messages_on_device(
        self, table: _LayerTable, x: torch.Tensor, routing: Routing
    ) -> list[ShardMessage]:
        ids = routing.expert_ids  # [N, k]
        flat = ids.reshape(-1).cpu()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel()) - starts[flat[order]]
        copy = rank % table.num_copies[flat]
        shard_of_pair = table.copy_shards[flat, copy].view(ids.shape).to(ids.device)  # [N, k]
        out = []
        for shard in torch.unique(shard_of_pair).tolist():
            mine = shard_of_pair == shard
            rows = mine.any(dim=1).nonzero().squeeze(1)
            masked = torch.where(mine[rows], ids[rows], torch.full_like(ids[rows], self.num_experts))
            out.append(ShardMessage(int(shard), rows, x[rows], masked, routing.weights[rows]))
        return out

    def _messages_on_host(self, table: _LayerTable, x: torch.Tensor, routing: Routing) -> list[ShardMessage]:
        """`_messages` for small calls, the same assignment (pair rank counted in row-major order)."""
        ids = routing.expert_ids.tolist()
        rank = [0] * self.num_experts
        per_shard: dict[int, tuple[list[int], list[list[int]]]] = {}  # shard -> (rows, masked ids)
        for row, row_ids in enumerate(ids):
            shards = []
            for e in row_ids:
                copies = table.copies[e]
                shards.append(copies[rank[e] % len(copies)])
                rank[e] += 1
            for shard in set(shards):
                rows, masked = per_shard.setdefault(shard, ([], []))
                rows.append(row)
                masked.append(
                    [e if s == shard else self.num_experts for e, s in zip(row_ids, shards, strict=True)]
                )
        if len(per_shard) == 1:  # one shard holds every pair: the call's own tensors
            (shard,) = per_shard
            index = torch.arange(len(ids), device=x.device)
            return [ShardMessage(shard, index, x, routing.expert_ids, routing.weights, is_every_row=True)]
        out = []
        for shard in sorted(per_shard):
            rows, masked = per_shard[shard]
            index = torch.tensor(rows, device=x.device)
            expert_ids = torch.tensor(masked, dtype=routing.expert_ids.dtype, device=x.device)
            out.append(ShardMessage(shard, index, x[index], expert_ids, routing.weights[index]))
        return out

    def submit(self, layer: int, x: torch.Tensor, routing: Routing) -> Pending:
        with self._idle:  # the table and its generation are read together: a switch never splits them
            generation, table = self._generation, self._tables[layer]
            self._in_flight[generation] = self._in_flight.get(generation, 0) + 1
        try:
            messages = self._messages(table, x, routing)
            handle = self.transport.send(layer, messages)
        except BaseException:
            self._done(generation)
            raise
        return Pending(handle, messages, x.shape[0], generation)

    def collect(self, pending: Pending, like: torch.Tensor) -> torch.Tensor:
        try:
            partials = self.transport.wait(pending.handle)
            # remote shards answer on the host: results join the caller's device and dtype
            if len(partials) == 1 and pending.messages[0].is_every_row:
                return partials[0].to(like.device, like.dtype)
            out = torch.zeros_like(like)
            for message, partial in zip(pending.messages, partials, strict=True):
                out.index_add_(0, message.rows, partial.to(out.device, out.dtype))
            return out
        finally:
            self._done(pending.generation)

    def _done(self, generation: int) -> None:
        with self._idle:
            self._in_flight[generation] -= 1
            if not self._in_flight[generation]:
                del self._in_flight[generation]
            self._idle.notify_all()

    def run(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.collect(self.submit(layer, x, routing), x)
