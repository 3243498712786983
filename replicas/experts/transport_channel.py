"""Expert transport for served replicas: the same-node channel (`channel_server.py`) to every shard
on this replica's node, Ray actor calls (`transport_ray.py`) to the others.

Ray stays the control plane: the shard actors are placed, restarted and rebalanced as before, and
hand out their channel's address (`ExpertShardActor.open_channel`). Only the per-layer data moves
over the channel: one CALL per shard per MoE layer, rows written straight into the shard's input
buffer.

Faults, per shard:
- the shard died (its connection closed): the layer's call is sent again over Ray, which waits for
  the restarted actor, so the step loses time, not requests; the channel reconnects later;
- the shard hung (no reply in `call_timeout_s`): ExpertCallTimeout, as on Ray, and the channel is
  dropped (a late reply would put it out of step);
- until a shard's channel address is in (at start, while it restarts) its calls go over Ray: the
  engine never waits to connect; a failed connect is tried again after `RECONNECT_AFTER_S`.
A second call to a shard while one is in flight on its channel (ping-pong's second micro-batch)
goes over Ray: a channel holds one call at a time.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch

from replicas.experts.channel_server import (
    HEADER,
    OP_CALL,
    OP_MAP,
    REPLY,
    STATUS_OK,
    ChannelAddress,
    map_buffers,
    recv_exact,
)
from replicas.experts.dispatch import ExpertTransport, ShardMessage
from replicas.experts.transport_ray import DEFAULT_CALL_TIMEOUT_S, ExpertCallTimeout, RayTransport
from replicas.experts.wire import grown, pack_into

INITIAL_CAPACITY = 64  # rows; decode batches fit without a MAP
CONNECT_TIMEOUT_S = 2.0
RECONNECT_AFTER_S = 5.0
SHM_ROOT = "/dev/shm"


def buffer_root(num_bytes: int) -> str | None:
    """Where a channel's buffer files go: /dev/shm when it has room for them twice over (a container's
    /dev/shm is often 64 MiB, and writing past its size kills the writer with SIGBUS), else the
    temporary directory (the mappings are shared all the same; pages may be written back to disk)."""
    try:
        stat = os.statvfs(SHM_ROOT)
    except OSError:
        return None
    return SHM_ROOT if stat.f_bavail * stat.f_frsize >= 2 * num_bytes else None


class ShardComputeError(RuntimeError):
    """The shard's compute raised (a bug or a bad message, not a transient fault)."""


class ShardChannelLost(ConnectionError):
    """The shard's end of the channel closed (its process died)."""


class ShardChannel:
    """One connection to one shard, with its two shared buffers."""

    def __init__(self, path: str, call_timeout_s: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CONNECT_TIMEOUT_S)
        self.sock.connect(path)
        self.sock.settimeout(call_timeout_s)
        self.capacity = 0
        self.req = self.resp = torch.empty(0, 0)  # [capacity, H + 2k], [capacity, H]
        self.rows: int | None = None  # the call in flight

    def _map(self, rows: int, hidden_size: int, width: int) -> None:
        capacity = grown(max(self.capacity, INITIAL_CAPACITY), rows)
        folder = tempfile.mkdtemp(
            prefix="mimo-channel-", dir=buffer_root(capacity * (width + hidden_size) * 4)
        )
        try:
            prefix = os.path.join(folder, "buffer")
            for suffix, columns in ((".in", width), (".out", hidden_size)):
                with open(prefix + suffix, "wb") as f:
                    f.truncate(capacity * columns * 4)
            self.req, self.resp = map_buffers(prefix, capacity, width, hidden_size)
            name = prefix.encode()
            self.sock.sendall(HEADER.pack(OP_MAP, capacity, len(name)) + name)
            self._reply()
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # both sides hold mappings; no files left
        self.capacity = capacity

    def _reply(self) -> None:
        reply = recv_exact(self.sock, REPLY.size)
        if reply is None:
            raise ShardChannelLost("the expert shard closed its channel")
        status, n = REPLY.unpack(reply)
        if status != STATUS_OK:
            raise ShardComputeError((recv_exact(self.sock, n) or b"").decode())

    def call(self, layer: int, m: ShardMessage) -> None:
        (rows, h), k = m.x.shape, m.expert_ids.shape[1]
        if rows > self.capacity or self.resp.shape[1] != h:
            self._map(rows, h, h + 2 * k)
        pack_into(self.req[:rows], m.x, m.expert_ids, m.weights)
        self.sock.sendall(HEADER.pack(OP_CALL, layer, rows))
        self.rows = rows

    def result(self) -> torch.Tensor:
        rows, self.rows = self.rows, None
        assert rows is not None
        self._reply()
        return self.resp[:rows].clone()  # the buffer is the next call's

    def close(self) -> None:
        self.sock.close()


class ChannelTransport(ExpertTransport):
    is_async = True  # shards compute in their own processes while the caller runs on

    def __init__(self, actors: Sequence[Any], call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        self.ray = RayTransport(actors, call_timeout_s)
        self.call_timeout_s = call_timeout_s
        self.node_id = str(ray.get_runtime_context().get_node_id())
        self._channels: dict[int, ShardChannel | None] = {}  # None: the shard is on another node
        self._asked: dict[int, Any] = {}  # shard -> its open_channel call in flight
        self._retry_at: dict[int, float] = {}  # shard -> when to ask again after a failure
        self.num_channel_calls = 0
        self.num_ray_calls = 0

    def use_actors(self, actors: Sequence[Any]) -> None:
        """A placement switch's new shard list: channels to shards whose actor changed reconnect."""
        old = self.ray.actors
        self.ray.use_actors(actors)
        for shard, actor in enumerate(self.ray.actors):
            if shard >= len(old) or actor._actor_id != old[shard]._actor_id:
                self._drop(shard)

    def _drop(self, shard: int) -> None:
        self._asked.pop(shard, None)
        channel = self._channels.pop(shard, None)
        if channel is not None:
            channel.close()

    def _channel(self, shard: int) -> ShardChannel | None:
        """The shard's channel, None while there is none (calls go over Ray). Asking a shard for its
        address never blocks the engine: the answer is picked up by a later call once it is in (a
        restarting shard answers when it is back)."""
        if shard in self._channels:
            return self._channels[shard]
        asked = self._asked.get(shard)
        if asked is None:
            if time.monotonic() < self._retry_at.get(shard, 0.0):
                return None
            asked = self._asked[shard] = self.ray.actors[shard].open_channel.remote()
        ready, _ = ray.wait([asked], timeout=0)
        if not ready:
            return None
        del self._asked[shard]
        try:
            address: ChannelAddress = ray.get(asked)
            channel = (
                ShardChannel(address.path, self.call_timeout_s) if address.node_id == self.node_id else None
            )
        except (ray.exceptions.RayError, OSError):  # the shard failed, or its socket is gone
            self._retry_at[shard] = time.monotonic() + RECONNECT_AFTER_S
            return None
        self._channels[shard] = channel
        return channel

    def send(self, layer: int, messages: list[ShardMessage]) -> object:
        calls: list[tuple[ShardMessage, ShardChannel | None, object]] = []
        for m in messages:
            channel = self._channel(m.shard)
            if channel is not None and channel.rows is None:
                try:
                    channel.call(layer, m)
                    calls.append((m, channel, None))
                    self.num_channel_calls += 1
                    continue
                except OSError:  # the shard's end is gone (or hung while we mapped): over Ray
                    self._drop(m.shard)
            calls.append((m, None, self.ray.send(layer, [m])))
            self.num_ray_calls += 1
        return layer, calls

    def wait(self, handle: object) -> list[torch.Tensor]:
        """Collects every call, also after one failed (a channel left with an unread reply would be
        out of step), then raises the first failure."""
        assert isinstance(handle, tuple)
        layer, calls = handle
        out: list[torch.Tensor] = []
        failure: BaseException | None = None
        for m, channel, ref in calls:
            try:
                out.append(self._collect(layer, m, channel, ref))
            except Exception as e:
                failure = failure or e
        if failure is not None:
            raise failure
        return out

    def _collect(
        self, layer: int, m: ShardMessage, channel: ShardChannel | None, ref: object
    ) -> torch.Tensor:
        if channel is None:
            return self.ray.wait(ref)[0]
        try:
            return channel.result()
        except TimeoutError:
            self._drop(m.shard)
            raise ExpertCallTimeout(
                f"an expert shard did not answer within {self.call_timeout_s} s"
            ) from None
        except (ShardChannelLost, OSError):  # the shard died: Ray waits for its restart and retries
            self._drop(m.shard)
            self.num_ray_calls += 1
            return self.ray.wait(self.ray.send(layer, [m]))[0]

    def close(self) -> None:
        for shard in list(self._channels):
            self._drop(shard)
