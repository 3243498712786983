"""`mimo serve` is private by default: every socket its processes listen on is on loopback, or
refuses a call that lacks the cluster's Ray token; the token is the user's alone (a 0600 file in a
0700 directory, removed at shutdown). Probes go to 127.0.0.1 only."""

from __future__ import annotations

import ipaddress
import os
import signal
import stat
from pathlib import Path

import grpc
import openai
import psutil
import pytest

from cluster.cli.local_server import free_port
from tests.integration.mimo_serve_process import mimo_serve

pytestmark = pytest.mark.integration
# a unary method of the channel every Serve replica serves other replicas on
REPLICA_METHOD = "/ray.serve.ASGIService/HandleRequest"


def _listeners(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `root` and its descendants:
    the driver, GCS, raylet, dashboard agent and every worker (Serve proxy, replicas, shards)."""
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN:
                found.append((name, c.laddr.ip, c.laddr.port))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _call_code(port: int, token: str | None) -> grpc.StatusCode:
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(REPLICA_METHOD)
        try:
            call(b"", timeout=10, metadata=metadata)
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_every_listener_is_on_loopback_or_refuses_calls_without_the_token(tmp_path: Path) -> None:
    """Catches a cluster started with Ray's token auth off (RAY_AUTH_MODE=disabled): Serve replicas
    listen on every interface and run what they are sent, so anyone reaching the machine could run
    code in it. Also catches a token file others can read, or one left behind at shutdown."""
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(f"gateway:\n  port: {port}\nengine:\n  kv_cache_mib: 48\n  max_model_len: 1024\n")
    with mimo_serve(config) as (proc, url):
        root = psutil.Process(proc.pid)
        # the GCS's environment is what `mimo serve` handed the cluster (its own /proc environ
        # shows only what it was started with)
        gcs = next(p for p in root.children(recursive=True) if p.name() == "gcs_server")
        token_path = Path(gcs.environ()["RAY_AUTH_TOKEN_PATH"])
        assert gcs.environ()["RAY_AUTH_MODE"] == "token"
        assert token_path != Path(os.environ["RAY_AUTH_TOKEN_PATH"])  # a token of its own
        assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_path.parent.stat().st_mode) == 0o700
        token = token_path.read_text().strip()

        listeners = _listeners(root)
        assert ("127.0.0.1", port) in {(ip, p) for _, ip, p in listeners}  # the API, loopback only
        exposed = [(name, p) for name, ip, p in listeners if not _is_loopback(ip)]
        # Ray 2.60 binds each Serve replica's inter-deployment channel to [::] itself
        assert exposed, "expected the Serve replicas' channels; is the process tree listed?"
        for name, exposed_port in exposed:
            assert _call_code(exposed_port, None) == grpc.StatusCode.UNAUTHENTICATED, name
            # the same probe with the token gets past auth: the refusal above is auth, not the probe
            assert _call_code(exposed_port, token) != grpc.StatusCode.UNAUTHENTICATED, name

        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        reply = client.completions.create(model="mimo-tiny", prompt="Hi", max_tokens=2)
        assert reply.usage is not None and reply.usage.completion_tokens == 2  # the probes hurt nothing
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    assert not token_path.parent.exists()
