"""A Redis server (Debian's `redis-server`, installed by scripts/setup) for GCS fault tolerance:
bound to 127.0.0.1 on a free port, with a password, nothing saved to disk; stopped by its PID."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.cli.local_server import free_port


@dataclass(frozen=True)
class RedisServer:
    address: str  # host:port
    password: str
    pid: int


def num_keys(server: RedisServer) -> int:
    """Keys the server holds (DBSIZE): the GCS's tables when the GCS stores them there."""
    host, port = server.address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"AUTH {server.password}\r\nDBSIZE\r\n".encode())
        time.sleep(0.2)
        reply = s.recv(256).decode()
    return int(reply.split(":")[1].split()[0])


def _answers(port: int, password: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            time.sleep(0.1)
            return b"+PONG" in s.recv(256)
    except OSError:
        return False


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `bash scripts/setup` (its test mode)")
    port, password = free_port(), secrets.token_hex(16)
    config = workdir / "redis.conf"  # the password in a 0600 file, not on a command line
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"bind 127.0.0.1\nport {port}\nprotected-mode yes\nrequirepass {password}\n")
        f.write(f'save ""\nappendonly no\ndir {workdir}\n')
    proc = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _answers(port, password):
            assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
            assert time.monotonic() < deadline, "redis-server did not answer within 30 s"
            time.sleep(0.2)
        yield RedisServer(f"127.0.0.1:{port}", password, proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
