"""The same-node expert channel, shard side: a Unix socket that carries only small headers, and two
shared-memory buffers per connection that carry the rows.

Why: a Ray actor call costs about a millisecond per shard per MoE layer on a busy host (the task
path, the object store, the actor's event loop), which is most of a served decode step. An attention
replica on the shard's node instead writes a layer's rows straight into the shard's input buffer
(`wire.pack_into`), sends a 12-byte CALL header, and reads the partial output from the output buffer
when the 8-byte reply arrives: one wake-up each way, no copy through a socket, no serialization.

Protocol, per connection (the client is `transport_channel.ChannelTransport`), little-endian int32:
- MAP  (op, capacity, n) + n bytes of a file prefix: the client made `prefix.in` [capacity, H + 2k]
  and `prefix.out` [capacity, H], fp32; the server maps both and answers; the client then unlinks
  the files (the mappings live on, and nothing is left behind if either side dies). A longer call
  than the capacity makes the client MAP bigger buffers first.
- CALL (op, layer, rows): rows [0, rows) of the input buffer -> rows [0, rows) of the output buffer.
- Reply (status, n): status 0 is done; 1 is an error in the shard's compute, its text in n bytes.
One call is in flight per connection. The socket lives in a private directory (mode 0700), so only
processes of the same user can connect; nothing listens on a network interface.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from replicas.experts.wire import unpack

OP_MAP = 1
OP_CALL = 2
HEADER = struct.Struct("<iii")
REPLY = struct.Struct("<ii")
STATUS_OK = 0
STATUS_ERROR = 1


@dataclass(frozen=True)
class ChannelAddress:
    node_id: str  # a client on another node cannot use the channel
    path: str  # the shard's Unix socket


Compute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def recv_exact(conn: socket.socket, n: int) -> bytes | None:
    """n bytes, or None when the peer closed the connection first."""
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)


def map_buffers(
    prefix: str, capacity: int, width: int, hidden_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input [capacity, width] and output [capacity, hidden_size] fp32 buffers at `prefix`."""
    req = torch.from_file(f"{prefix}.in", shared=True, size=capacity * width, dtype=torch.float32)
    resp = torch.from_file(f"{prefix}.out", shared=True, size=capacity * hidden_size, dtype=torch.float32)
    return req.view(capacity, width), resp.view(capacity, hidden_size)


class ChannelServer:
    """Serves one thread per connected attention replica; `compute(layer, x, ids, weights)` is the
    shard's (it must take its own lock: the shard's Ray calls run beside it)."""

    def __init__(self, compute: Compute, hidden_size: int, top_k: int) -> None:
        self.compute = compute
        self.hidden_size = hidden_size
        self.width = hidden_size + 2 * top_k
        self._dir = tempfile.mkdtemp(prefix="mimo-shard-")  # mode 0700
        self.path = os.path.join(self._dir, "channel.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen()
        threading.Thread(target=self._accept, name="expert-channel", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="expert-channel-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffers: tuple[torch.Tensor, torch.Tensor] | None = None
            while (header := recv_exact(conn, HEADER.size)) is not None:
                op, a, b = HEADER.unpack(header)
                if op == OP_MAP:
                    prefix = recv_exact(conn, b)
                    if prefix is None:
                        return
                    buffers = map_buffers(prefix.decode(), a, self.width, self.hidden_size)
                    conn.sendall(REPLY.pack(STATUS_OK, 0))
                elif op == OP_CALL and buffers is not None:
                    conn.sendall(self._call(buffers, a, b))
                else:
                    return  # a client out of step: drop it, it reconnects

    def _call(self, buffers: tuple[torch.Tensor, torch.Tensor], layer: int, rows: int) -> bytes:
        req, resp = buffers
        try:
            x, ids, weights = unpack(req[:rows], self.hidden_size)  # views of the client's rows
            resp[:rows].copy_(self.compute(layer, x, ids, weights))
        except Exception as e:  # the shard's error, the caller's to report; the channel stays in step
            text = f"{type(e).__name__}: {e}".encode()[:4096]
            return REPLY.pack(STATUS_ERROR, len(text)) + text
        return REPLY.pack(STATUS_OK, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)
