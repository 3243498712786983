"""CPU seconds spent by each serving role on this host, read from /proc (Linux), for benchmarks that
put a router's whole path on one machine and want to show what each hop costs per request.

A role is a set of processes recognised by their command line: Ray renames a worker process after
the actor it hosts (`ray::ServeReplica:mimo:Gateway...`, `ray::ProxyActor`), so the roles below
find Serve's proxy, our gateway replicas, direct streaming's route chooser and HAProxy, the
attention replicas (ours, or a benchmark's `ServeWorker` replicas), Serve's controller, Ray's own
daemons, sglang-router and bare worker processes. Processes that ended between two snapshots drop out of the difference (their CPU is
lost, never double counted); off Linux a snapshot is empty and so is every difference.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

ROLES: dict[str, re.Pattern[str]] = {
    "serve_proxy": re.compile(r"ProxyActor"),
    "gateway": re.compile(r"[:#]Gateway\b"),
    "route_chooser": re.compile(r"[:#]RouteChooser\b"),  # direct streaming's ingress request router
    "haproxy": re.compile(r"HAProxyManager|/haproxy\b"),  # Serve's HAProxy manager and HAProxy itself
    "attention": re.compile(r"[:#](Attention|Worker)\b|routing_worker\.py"),
    "serve_controller": re.compile(r"ServeController"),
    "ray_system": re.compile(r"\b(raylet|gcs_server)\b"),
    "sglang_router": re.compile(r"sglang[:_]+router"),
}

Snapshot = dict[str, dict[int, float]]  # role -> pid -> CPU seconds (user + system)


def role_of(cmdline: str, roles: Mapping[str, re.Pattern[str]] = ROLES) -> str | None:
    """The first role whose pattern the command line matches, or None."""
    for role, pattern in roles.items():
        if pattern.search(cmdline):
            return role
    return None


def snapshot(roles: Mapping[str, re.Pattern[str]] = ROLES, proc: Path = Path("/proc")) -> Snapshot:
    """CPU seconds so far of every process in a role, by pid."""
    out: Snapshot = {}
    if not proc.is_dir():
        return out
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        role = role_of(cmdline, roles)
        if role is None:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3 of stat(5)
        out.setdefault(role, {})[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_seconds(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each role spent between the two snapshots (processes alive at both, plus those
    started in between, counted from zero)."""
    spent: dict[str, float] = {}
    for role, pids in after.items():
        earlier = before.get(role, {})
        spent[role] = sum(seconds - earlier.get(pid, 0.0) for pid, seconds in pids.items())
    return spent
