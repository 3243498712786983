"""Collective expert transport: torch.distributed point-to-point over gloo (CPU buffers; NCCL would
need the buffers on the GPU).

The attention replica is rank 0; expert shard s is rank s + 1 and runs `serve_shard`, a loop that
receives one message per MoE layer and sends the partial output back. A message is ONE fp32 tensor
[1 + rows, H + 2k]: row 0 is the header (layer, rows), rows 1.. are the packed rows (`wire.py`).
The shard receives into a preallocated buffer of `capacity` rows (gloo accepts a shorter message
than the buffer); both sides grow the capacity in lockstep, announced by a header-only GROW
message, so steady-state decode costs one send and one receive per shard per layer (a separate
header message cost a second wake-up of the shard per layer). The shard process runs as a batch
worker (`cpu_policy.py`) so its wake-up never preempts rank 0 mid-fan-out. A header with layer STOP
ends the loop. One process group serves one attention replica; M-to-N sharing goes through the Ray
transport.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from replicas.experts.cpu_policy import run_as_batch_worker
from replicas.experts.dispatch import ExpertTransport, ShardMessage
from replicas.experts.expert_shard import ExpertShard
from replicas.experts.wire import grown, pack_into, unpack

STOP = -1
GROW = -2
INITIAL_CAPACITY = 64  # rows; decode batches fit without a GROW


def init_group(rank: int, world_size: int, address: str, port: int, backend: str = "gloo") -> None:
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size)


def serve_shard(shard: ExpertShard, hidden_size: int) -> int:
    """Runs in the shard's process (rank >= 1, after `init_group`) until rank 0 sends STOP; returns
    messages served."""
    run_as_batch_worker()  # after init_group: gloo's receive thread is one of the threads changed
    top_k = shard.config.num_experts_per_tok
    width = hidden_size + 2 * top_k
    capacity = INITIAL_CAPACITY
    buffer = torch.empty(1 + capacity, width)
    served = 0
    while True:
        dist.recv(buffer, src=0)
        layer, rows = int(buffer[0, 0]), int(buffer[0, 1])
        if layer == STOP:
            return served
        if layer == GROW:
            capacity = rows
            buffer = torch.empty(1 + capacity, width)
            continue
        # views into the buffer: compute reads them before the next recv overwrites it
        x, ids, weights = unpack(buffer[1 : 1 + rows], hidden_size)
        dist.send(shard.compute(layer, x, ids, weights).float().contiguous(), dst=0)
        served += 1


class CollectiveTransport(ExpertTransport):
    """Rank 0's side; construct after `init_group(0, ...)`."""

    is_async = True  # shards compute in other processes while this one runs on

    def __init__(self, num_shards: int, hidden_size: int) -> None:
        self.num_shards = num_shards
        self.hidden_size = hidden_size
        self.capacity = [INITIAL_CAPACITY] * num_shards  # mirrors each shard's receive buffer

    def _header(self, layer: int, rows: int, top_k: int) -> torch.Tensor:
        message = torch.zeros(1, self.hidden_size + 2 * top_k)
        message[0, 0], message[0, 1] = layer, rows
        return message

    def send(self, layer: int, messages: list[ShardMessage]) -> object:
        pending = []
        h = self.hidden_size
        for m in messages:
            rows, top_k = m.expert_ids.shape
            if rows > self.capacity[m.shard]:
                self.capacity[m.shard] = grown(self.capacity[m.shard], rows)
                dist.send(self._header(GROW, self.capacity[m.shard], top_k), dst=m.shard + 1)
            payload = torch.empty(1 + rows, h + 2 * top_k)  # one message: header row + rows
            payload[0].zero_()
            payload[0, 0], payload[0, 1] = layer, rows
            pack_into(payload[1:], m.x, m.expert_ids, m.weights)
            send_work = dist.isend(payload, dst=m.shard + 1)
            result = torch.empty(rows, h)
            pending.append((send_work, dist.irecv(result, src=m.shard + 1), result, payload))
        return pending

    def wait(self, handle: object) -> list[torch.Tensor]:
        assert isinstance(handle, list)
        out = []
        for send_work, recv_work, result, _payload in handle:  # the payload lives until sent
            send_work.wait()
            recv_work.wait()
            out.append(result)
        return out

    def shutdown(self) -> None:
        for shard in range(self.num_shards):
            dist.send(self._header(STOP, 0, 0), dst=shard + 1)
        dist.destroy_process_group()
