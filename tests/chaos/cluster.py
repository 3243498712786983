"""A Ray cluster of its own for one chaos test module: several raylets on 127.0.0.1 (Ray's
`cluster_utils.Cluster`), token auth on as everywhere in the test run (tests/conftest.py), the
application deployed with its control plane (gateway, expert pool owner) pinned to the head node,
and where the data plane's actors landed.

A driver talks to one cluster at a time: the session cluster of tests/integration, if one is up,
is left running and the driver reconnects to it when the chaos cluster is gone."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.schema import ServeDeploySchema

from cluster.cli.local_server import free_port
from cluster.serving.deploy import wait_running
from cluster.serving.ray_private import start_serve
from cluster.serving.serve_config import render_serve_config
from cluster.spec import ClusterSpec

HEAD = "chaos_head"  # custom resource of the head node: the control plane is pinned to it
KEY = "sk-chaos"
LOOPBACK = {"node_ip_address": "127.0.0.1"}


@contextmanager
def own_cluster(head_cpus: float, env: dict[str, str] | None = None, **head_args: Any) -> Iterator[Cluster]:
    """A fresh cluster (head only; add workers with `add_worker`), the driver connected to it.
    `env` is set while the cluster's processes start (they inherit it), then restored."""
    previous = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    if previous is not None:
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **LOOPBACK,
            "num_cpus": head_cpus,
            "resources": {HEAD: 1},
            "include_dashboard": False,
            **head_args,
        },
    )
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with contextlib.suppress(Exception):  # a cluster half gone after a fault is torn down anyway
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        if previous is not None:
            ray.init(address=previous, log_to_driver=False)


def add_worker(cluster: Cluster, num_cpus: float, name: str) -> Any:
    """A worker raylet with `num_cpus` and a custom resource `name` (its identity)."""
    return cluster.add_node(node_ip_address="127.0.0.1", num_cpus=num_cpus, resources={name: 1})


def head_node(cluster: Cluster) -> Any:
    """The head's `ray._private.node.Node` (kill_gcs_server / start_gcs_server, node_id)."""
    assert cluster.head_node is not None
    return cluster.head_node


@dataclass(frozen=True)
class App:
    url: str  # .../v1
    spec: ClusterSpec
    overrides: dict[str, Any]  # the spec fields the test set (what chaos.json records)


def chaos_spec(keys_file: Path, **sections: dict[str, Any]) -> tuple[ClusterSpec, dict[str, Any]]:
    """The chaos tests' spec: 2 attention replicas and 2 shards of half a CPU each, fixed sizes, a
    small KV cache, HTTP on a free loopback port; `sections` override or add fields per section."""
    overrides: dict[str, Any] = {
        "engine": {"kv_cache_mib": 48, "max_model_len": 1024},
        "attention": {"num_replicas": 2, "num_cpus": 0.5},
        "experts": {"num_shards": 2, "num_cpus": 0.5, "call_timeout_s": 60.0, "eplb_interval_s": 0},
        "gateway": {"port": free_port(), "proxy_location": "HeadOnly", "api_keys_file": str(keys_file)},
        "autoscaling": {"enabled": False},
    }
    for section, fields in sections.items():
        overrides[section] = {**overrides.get(section, {}), **fields}
    spec = ClusterSpec.from_dict(overrides)
    # what chaos.json records: the fields set, less this run's port and key file
    overrides["gateway"] = {
        k: v for k, v in overrides["gateway"].items() if k not in ("port", "api_keys_file")
    }
    return spec, overrides


def deploy_pinned(spec: ClusterSpec, overrides: dict[str, Any], timeout_s: float = 300.0) -> App:
    """Deploys `spec` as `cluster.serving.deploy.deploy` does, with the Gateway and ExpertPool
    replicas (0 CPUs: they could land on any node) pinned to the head, so a worker node's loss takes
    the data plane's actors on it and nothing else."""
    config = render_serve_config(spec)
    pin = {"num_cpus": 0, "resources": {HEAD: 0.001}}
    deployments = config["applications"][0]["deployments"]
    for d in deployments:
        if d["name"] == "Gateway":
            d["ray_actor_options"] = pin
    deployments.append({"name": "ExpertPool", "ray_actor_options": pin})
    g = spec.gateway
    start_serve(g.host, g.port, g.proxy_location).deploy_apps(ServeDeploySchema.model_validate(config))
    wait_running(timeout_s)
    return App(f"http://127.0.0.1:{g.port}/v1", spec, overrides)


def _node_and_pid(handle: Any) -> tuple[str, int]:
    def where(self: Any) -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), os.getpid()

    node, pid = ray.get(handle.__ray_call__.remote(where), timeout=60)
    return str(node), int(pid)


def attention_replicas() -> list[tuple[str, int]]:
    """(node id, pid) of every live Attention replica."""
    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "SERVE_REPLICA::mimo#Attention" in actor["name"]:
            try:
                found.append(_node_and_pid(ray.get_actor(actor["name"], namespace=actor["namespace"])))
            except (ray.exceptions.RayActorError, ValueError, ray.exceptions.GetTimeoutError):
                continue  # a replica that is gone or going
    return found


def expert_shards() -> list[tuple[str, int]]:
    """(node id, pid) of every expert shard actor, as the pool publishes them."""
    update = serve.get_deployment_handle("ExpertPool", "mimo").current.remote().result(timeout_s=60)
    return [
        (str(ray.get(a.node_id.remote(), timeout=60)), int(ray.get(a.pid.remote(), timeout=60)))
        for a in update.actors
    ]


def node_id_of(node: Any) -> str:
    return str(node.node_id)


def wait_until(predicate: Any, timeout_s: float, what: str) -> float:
    """Seconds until `predicate()` holds; raises AssertionError naming `what` after `timeout_s`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.5)
    return time.monotonic() - started


def attention_preemptions() -> int:
    """Preemptions of every live Attention replica's engine so far. Read through Serve's replica
    internals (Ray 2.60's ReplicaActor -> user callable): a test's window only, never the product's."""

    def count(self: Any) -> int:
        deployment = self._replica_impl._user_callable_wrapper._callable
        return int(deployment.engine.snapshot().num_preemptions)

    refs = [
        ray.get_actor(actor["name"], namespace=actor["namespace"]).__ray_call__.remote(count)
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA::mimo#Attention" in actor["name"]
    ]
    counts: list[Any] = ray.get(refs, timeout=60)
    return sum(int(n) for n in counts)
