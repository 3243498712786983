"""The expert pool's owner lost under steady streaming load: the `ExpertPool` replica killed, and
with it (fate sharing) every expert shard actor it created, as when the node holding it dies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from cluster.serving.deploy import wait_running
from tests.chaos.cluster import KEY, add_worker, chaos_spec, deploy_pinned, expert_shards, own_cluster
from tests.chaos.load import LoadConfig, SteadyLoad, summarize
from tests.chaos.record import record_fault

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_a_lost_expert_pool_owner_is_replaced_and_the_replicas_follow_its_new_shards(
    keys_file: Path,
) -> None:
    """Catches attention replicas that keep calling the dead shards of a pool that was replaced:
    the new pool started at placement version 0, which the replicas already had, so their sync
    never handed them the new shard actors and every request failed from then on."""
    with own_cluster(head_cpus=2) as cluster:
        add_worker(cluster, 1, "chaos_worker")
        spec, overrides = chaos_spec(keys_file)
        app = deploy_pinned(spec, overrides)
        old = {pid for _, pid in expert_shards()}
        load = SteadyLoad(LoadConfig(app.url, KEY, concurrency=4, max_tokens=32)).start()
        try:
            assert load.wait_for_successes(4, timeout_s=120), "no steady load before the fault"
            owner = next(
                a for a in ray.util.list_named_actors(all_namespaces=True) if "mimo#ExpertPool" in a["name"]
            )
            fault_s = time.monotonic()
            ray.kill(ray.get_actor(owner["name"], namespace=owner["namespace"]), no_restart=True)
            assert load.wait_for_successes(3, timeout_s=240, after_s=fault_s), "never served again"
            time.sleep(10)  # and keeps serving
            recent = [r for r in load.records if r.sent_s > time.monotonic() - 8]
        finally:
            load.stop()
        wait_running(300)
        assert not old & {pid for _, pid in expert_shards()}  # the shards are new ones
        summary = summarize(load.records, fault_s)
        summary["failed_in_the_last_8_s"] = sum(r.outcome != "ok" for r in recent if r.outcome != "pending")
        record_fault(
            "expert_pool_owner_loss",
            summary,
            overrides,
            fault="the ExpertPool Serve replica killed (ray.kill); its shard actors die with it",
            nodes="head 2 CPUs (control plane pinned), worker 1 CPU",
        )
        print(summary)
    assert summary["lost"] == 0, summary
    # requests on the lost shards end with a 503 or an error event that says to retry, not a 500
    assert summary["failed_other"] == 0, summary
    assert summary["failed_in_the_last_8_s"] == 0, summary  # serving normally again
