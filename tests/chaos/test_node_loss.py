"""A whole worker node lost under steady streaming load: its raylet and every process on it (an
attention replica and an expert shard) SIGKILLed, as when a machine dies. The default run's short
version is in test_default_run.py (one cluster with the overload surge)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.serving.deploy import wait_running
from tests.chaos.cluster import (
    KEY,
    App,
    add_worker,
    attention_replicas,
    chaos_spec,
    deploy_pinned,
    expert_shards,
    head_node,
    own_cluster,
    wait_until,
)
from tests.chaos.load import LoadConfig, SteadyLoad, summarize
from tests.chaos.record import record_fault

pytestmark = pytest.mark.integration
LAYOUT = "head 1 CPU (control plane pinned), victim 1 CPU, spare 1 CPU (added after deploy)"


@contextlib.contextmanager
def victim_cluster(keys_file: Path, **sections: dict[str, Any]) -> Any:
    """Yields (cluster, victim node, app). Head and victim have room for exactly one attention
    replica (0.5 CPU) and one expert shard (0.5 CPU, SPREAD) each, so the victim holds one of both;
    a spare node joins after the deploy and is where they can move."""
    with own_cluster(head_cpus=1) as cluster:
        victim = add_worker(cluster, 1, "chaos_victim")
        spec, overrides = chaos_spec(keys_file, **sections)
        app = deploy_pinned(spec, overrides)
        add_worker(cluster, 1, "chaos_spare")
        yield cluster, victim, app


def lose_the_victim(
    cluster: Any, victim: Any, app: App, serve_after_fault_s: float, concurrency: int, name: str
) -> dict[str, object]:
    replicas, shards = attention_replicas(), expert_shards()
    assert victim.node_id in {n for n, _ in replicas} and victim.node_id in {n for n, _ in shards}
    on_victim = [pid for node, pid in replicas + shards if node == victim.node_id]
    load = SteadyLoad(LoadConfig(app.url, KEY, concurrency=concurrency, max_tokens=32)).start()
    try:
        assert load.wait_for_successes(concurrency, timeout_s=120), "no steady load before the fault"
        fault_s = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)  # raylet and the node's Ray processes
        for pid in on_victim:  # the node's workers too, should any outlive their raylet
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert load.wait_for_successes(3, timeout_s=240, after_s=fault_s), "never served again"
        time.sleep(serve_after_fault_s)
    finally:
        load.stop()
    wait_running(300)
    survivors = sorted(n.node_id for n in [head_node(cluster), *cluster.worker_nodes])
    moved_s = wait_until(
        lambda: sorted(n for n, _ in attention_replicas()) == survivors,
        120,
        "an attention replica restarted on the spare node",
    )
    assert sorted(n for n, _ in expert_shards()) == survivors  # the shard's bundle moved there too
    summary = summarize(load.records, fault_s)
    record_fault(
        name,
        summary,
        app.overrides,
        fault="worker raylet and its processes SIGKILLed (Cluster.remove_node(allow_graceful=False))",
        nodes=LAYOUT,
        concurrency=concurrency,
        load_after_fault_s=serve_after_fault_s,
        replicas_back_on_spare_after_load_s=round(moved_s, 1),
    )
    print(name, summary)
    return summary


def check_node_loss(summary: dict[str, object]) -> None:
    assert summary["lost"] == 0, summary
    assert summary["failed_other"] == 0, summary  # only retriable errors, which clients retry
    assert summary["recover_s"] is not None, summary


@pytest.mark.slow
def test_lost_worker_node_under_longer_heavier_load(keys_file: Path) -> None:
    """Catches node loss that hangs requests (none may stay unanswered past the client's bound),
    fails them with a non-retriable error, or a cluster that comes back and then degrades (a dead
    shard handle kept, requests piling up): 8 streams, a minute of load after the fault."""
    with victim_cluster(keys_file) as (cluster, victim, app):
        check_node_loss(lose_the_victim(cluster, victim, app, 60, 8, "node_loss_slow"))
