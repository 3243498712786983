"""The head's GCS killed and restarted under steady streaming load, with GCS fault tolerance on an
external Redis (Debian's redis-server on loopback, with a password): the data plane does not go
through the GCS, so requests to running replicas keep succeeding, and the restarted GCS recovers
the cluster's state from Redis, so Serve can create replicas again afterwards."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster.serving.deploy import wait_running
from tests.chaos.cluster import (
    KEY,
    add_worker,
    attention_replicas,
    chaos_spec,
    deploy_pinned,
    head_node,
    own_cluster,
    wait_until,
)
from tests.chaos.load import LoadConfig, SteadyLoad, summarize
from tests.chaos.record import record_fault
from tests.chaos.redis_server import num_keys, redis_server

pytestmark = pytest.mark.integration


def _restart_gcs(keys_file: Path, workdir: Path, down_s: float, name: str) -> dict[str, object]:
    with (
        redis_server(workdir) as redis,
        own_cluster(
            head_cpus=2, env={"RAY_REDIS_ADDRESS": redis.address}, redis_password=redis.password
        ) as cluster,
    ):
        add_worker(cluster, 1, "chaos_worker")
        spec, overrides = chaos_spec(keys_file)
        app = deploy_pinned(spec, overrides)
        assert num_keys(redis) > 0  # the GCS keeps its tables in this Redis
        load = SteadyLoad(LoadConfig(app.url, KEY, concurrency=4, max_tokens=32)).start()
        try:
            assert load.wait_for_successes(4, timeout_s=120), "no steady load before the fault"
            fault_s = time.monotonic()
            head_node(cluster).kill_gcs_server()
            time.sleep(down_s)  # nothing here may call Ray: the driver's GCS client waits too
            restart_s = time.monotonic()
            head_node(cluster).start_gcs_server()
            back_s = time.monotonic() - restart_s
            while_down = [r for r in load.records if fault_s <= r.sent_s < restart_s]
            load.wait_for_successes(2, timeout_s=60, after_s=time.monotonic())
        finally:
            load.stop()
        # after the restart Serve creates a replica again: one more attention replica
        more, _ = chaos_spec(keys_file, attention={"num_replicas": 3})
        grown_s = time.monotonic()
        deploy_pinned(more.model_copy(update={"gateway": spec.gateway}), overrides)
        wait_running(300)
        wait_until(lambda: len(attention_replicas()) == 3, 120, "a third attention replica")
        grown_s = time.monotonic() - grown_s
        summary = summarize(load.records, fault_s)
        summary["sent_while_gcs_down"] = len(while_down)
        summary["completed_while_gcs_down"] = sum(r.outcome == "ok" for r in while_down)
        summary["errors_while_gcs_down"] = sum(r.outcome != "ok" for r in while_down)
        record_fault(
            name,
            summary,
            overrides,
            fault=f"GCS killed (head_node.kill_gcs_server), down {down_s} s, restarted on the same port",
            gcs_storage="external Redis 127.0.0.1 (redis-server, password)",
            nodes="head 2 CPUs (control plane pinned), worker 1 CPU",
            gcs_start_s=round(back_s, 1),
            new_replica_after_restart_s=round(grown_s, 1),
        )
        print(summary)
    return summary


def _check(summary: dict[str, object]) -> None:
    assert summary["lost"] == 0, summary
    assert summary["errors_while_gcs_down"] == 0, summary  # error rate while down: 0
    assert summary["failed_other"] == 0 and summary["failed_retriable"] == 0, summary
    assert isinstance(summary["completed_while_gcs_down"], int) and summary["completed_while_gcs_down"] > 0


@pytest.mark.slow
def test_gcs_restart_on_redis_keeps_serving_and_serve_can_scale_after(
    keys_file: Path, tmp_path: Path
) -> None:
    """Catches a data path that depends on the GCS (a handle, the router or the expert dispatch
    asking it per request): with the GCS down for 15 s every request still completes; and a GCS
    that comes back without the cluster's state (Serve could not add a replica afterwards)."""
    _check(_restart_gcs(keys_file, tmp_path, down_s=15, name="gcs_restart"))
