"""The same-node expert channel's protocol, both ends in this process (no Ray): rows arrive and
partial outputs come back exactly, buffers grow for a longer call, a shard error is reported and
leaves the channel in step, a killed shard is told apart from an error at once, and buffers leave a small
/dev/shm alone."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from replicas.experts import transport_channel
from replicas.experts.channel_server import ChannelServer
from replicas.experts.dispatch import ShardMessage
from replicas.experts.transport_channel import ShardChannel, ShardChannelLost, ShardComputeError

HIDDEN, TOP_K = 16, 2


def _compute(layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if layer == 99:
        raise ValueError("layer 99 is not held here")
    return x * weights.sum(1, keepdim=True) + ids.sum(1, keepdim=True) + layer


def _message(rows: int) -> ShardMessage:
    ids = torch.randint(0, 8, (rows, TOP_K))
    return ShardMessage(0, torch.arange(rows), torch.randn(rows, HIDDEN), ids, torch.rand(rows, TOP_K))


def test_calls_round_trip_exactly_and_buffers_grow() -> None:
    """Catches rows, ids or weights misplaced in the packed buffer, a stale output read after the
    buffers grew, and a channel out of step after a shard error."""
    server = ChannelServer(_compute, HIDDEN, TOP_K)
    channel = ShardChannel(server.path, call_timeout_s=10)
    try:
        for layer, rows in ((1, 3), (2, 200), (3, 7)):  # 200 rows: past the first buffers
            m = _message(rows)
            channel.call(layer, m)
            assert torch.equal(channel.result(), _compute(layer, m.x, m.expert_ids, m.weights.float()))
        channel.call(99, _message(2))
        with pytest.raises(ShardComputeError, match="layer 99 is not held here"):
            channel.result()
        m = _message(4)
        channel.call(5, m)
        assert torch.equal(channel.result(), _compute(5, m.x, m.expert_ids, m.weights))
    finally:
        channel.close()
        server.close()


def _serve(paths: Any) -> None:
    server = ChannelServer(_compute, HIDDEN, TOP_K)
    paths.put(server.path)
    time.sleep(600)  # the test kills it


def test_a_killed_shard_is_a_lost_channel_not_an_error() -> None:
    """Catches a dead shard process reported as a compute error (not retried) or waited for until
    the call timeout (a hang)."""
    ctx = mp.get_context("spawn")
    paths = ctx.Queue()
    shard = ctx.Process(target=_serve, args=(paths,))
    shard.start()
    try:
        channel = ShardChannel(paths.get(timeout=60), call_timeout_s=30)
        channel.call(1, _message(2))
        channel.result()
        os.kill(shard.pid or 0, signal.SIGKILL)
        shard.join(timeout=30)
        started = time.monotonic()
        with pytest.raises((ShardChannelLost, ConnectionError)):
            channel.call(1, _message(2))
            channel.result()
        assert time.monotonic() - started < 5  # told at once, not after the 30 s timeout
    finally:
        shard.kill()


def test_buffers_leave_a_small_dev_shm_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches buffers put in a /dev/shm too small for them (writing past it is a SIGBUS)."""
    free = {"bytes": 64 * 2**20}
    monkeypatch.setattr(
        transport_channel.os,
        "statvfs",
        lambda path: SimpleNamespace(f_bavail=free["bytes"] // 4096, f_frsize=4096),
    )
    assert transport_channel.buffer_root(8 * 2**20) == "/dev/shm"
    assert transport_channel.buffer_root(40 * 2**20) is None
