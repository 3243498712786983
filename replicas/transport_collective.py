"""Collective expert transport: torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

The attention replica is rank 0; expert shard s is rank s + 1 and runs `serve_shard`, a loop that
receives one message per MoE layer and sends the partial output back. A message is a 3-int header
(layer, rows, top_k) and one payload [rows, H + 2k] (x, expert ids as exact floats, weights), so
each layer costs one header + one payload send per shard and one receive back. A header with a
negative layer stops the loop. One process group serves one attention replica; M-to-N sharing
goes through the Ray transport.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from replicas.dispatch import ExpertTransport, ShardMessage
from replicas.expert_shard import ExpertShard

STOP = -1


def init_group(rank: int, world_size: int, address: str, port: int, backend: str = "gloo") -> None:
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size)


def serve_shard(shard: ExpertShard, hidden_size: int) -> int:
    """Runs in the shard's process (rank >= 1) until rank 0 sends STOP; returns messages served."""
    served = 0
    header = torch.empty(3, dtype=torch.int64)
    while True:
        dist.recv(header, src=0)
        layer, rows, top_k = header.tolist()
        if layer == STOP:
            return served
        payload = torch.empty(rows, hidden_size + 2 * top_k)
        dist.recv(payload, src=0)
        x = payload[:, :hidden_size]
        ids = payload[:, hidden_size : hidden_size + top_k].to(torch.long)
        weights = payload[:, hidden_size + top_k :]
        dist.send(shard.compute(layer, x.contiguous(), ids, weights.contiguous()).contiguous(), dst=0)
        served += 1


class CollectiveTransport(ExpertTransport):
    """Rank 0's side; construct after `init_group(0, ...)`."""

    def __init__(self, num_shards: int, hidden_size: int) -> None:
        self.num_shards = num_shards
        self.hidden_size = hidden_size

    def send(self, layer: int, messages: list[ShardMessage]) -> object:
        pending = []
        for m in messages:
            rows, top_k = m.expert_ids.shape
            header = torch.tensor([layer, rows, top_k], dtype=torch.int64)
            payload = torch.cat((m.x.float(), m.expert_ids.float(), m.weights.float()), dim=1).contiguous()
            dist.send(header, dst=m.shard + 1)
            send_work = dist.isend(payload, dst=m.shard + 1)
            result = torch.empty(rows, self.hidden_size)
            pending.append((send_work, dist.irecv(result, src=m.shard + 1), result))
        return pending

    def wait(self, handle: object) -> list[torch.Tensor]:
        assert isinstance(handle, list)
        out = []
        for send_work, recv_work, result in handle:
            send_work.wait()
            recv_work.wait()
            out.append(result)
        return out

    def shutdown(self) -> None:
        stop = torch.tensor([STOP, 0, 0], dtype=torch.int64)
        for shard in range(self.num_shards):
            dist.send(stop, dst=shard + 1)
        dist.destroy_process_group()
