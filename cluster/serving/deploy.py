"""Deploys a spec the way `serve deploy` and KubeRay do: the rendered Serve config through the
controller's declarative path. It is the only path that applies the application-level autoscaling
policy in Ray 2.60 (`serve.run` ignores it), so `mimo serve` and the tests use exactly what a
cluster in production runs."""

from __future__ import annotations

import time

from ray import serve
from ray.serve.schema import ServeDeploySchema

from cluster.serving.app import APP_NAME, check_engine_fits
from cluster.serving.ray_private import start_serve
from cluster.serving.serve_config import render_serve_config
from cluster.spec import ClusterSpec


def deploy(spec: ClusterSpec, timeout_s: float = 300.0) -> None:
    """Starts Serve (if needed) with the spec's HTTP options and deploys its application; returns
    once the application is RUNNING, raising with Serve's message if it fails."""
    check_engine_fits(spec)
    config = ServeDeploySchema.model_validate(render_serve_config(spec))
    g = spec.gateway
    start_serve(g.host, g.port, g.proxy_location).deploy_apps(config)
    wait_running(timeout_s)


def wait_running(timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {APP_NAME} failed to deploy: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {APP_NAME} not running after {timeout_s} s")
        time.sleep(0.5)
