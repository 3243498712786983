"""The Ray Serve config (the YAML `serve deploy` and KubeRay's `serveConfigV2` accept) of a spec.

One application, built by `cluster.serving.app:app_builder` from the whole spec passed as `args`, so the
config file carries every setting and nothing else needs to travel with it. Per-deployment options
that Serve reads from the config (replicas, in-flight and queue limits) are filled in from the
spec; actor resources, autoscaling and the request router stay in code, which owns those APIs.
"""

from __future__ import annotations

from typing import Any

import yaml

from cluster.serving.autoscaling_policy import application_autoscaling_policy
from cluster.spec import ClusterSpec

APP_NAME = "mimo"
IMPORT_PATH = "cluster.serving.app:app_builder"
GATEWAY = "Gateway"
ROUTE_CHOOSER = "RouteChooser"  # direct streaming's ingress request router (cluster/serving/route_chooser.py)
ATTENTION = "Attention"


def render_serve_config(spec: ClusterSpec) -> dict[str, Any]:
    """The Serve deploy config (Ray 2.60 `ServeDeploySchema`) that runs `spec`'s application."""
    # ray_actor_options stay in code: a config's value replaces the code's whole dict (runtime_env
    # included), and the code derives num_cpus/num_gpus from the same spec anyway.
    attention: dict[str, Any] = {
        "name": ATTENTION,
        "max_ongoing_requests": spec.attention.max_ongoing_requests,
        "max_queued_requests": spec.engine.max_queued_requests,
    }
    if not spec.autoscaling.enabled:
        # Serve rejects a fixed num_replicas beside an autoscaling_config, which the code sets
        # (from spec.attention.min/max_replicas) when autoscaling is on.
        attention["num_replicas"] = spec.attention.num_replicas
    return {
        "proxy_location": spec.gateway.proxy_location,
        "http_options": {"host": spec.gateway.host, "port": spec.gateway.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"spec": spec.model_dump(mode="json")},
                **(
                    {
                        "autoscaling_policy": application_autoscaling_policy(
                            spec, prometheus_url=spec.observability.prometheus_url
                        )
                    }
                    if spec.autoscaling.enabled
                    else {}
                ),
                "deployments": [
                    {
                        # direct streaming: the route chooser HAProxy asks takes the gateway's place
                        "name": ROUTE_CHOOSER if spec.gateway.direct_streaming else GATEWAY,
                        "num_replicas": 1 if spec.gateway.direct_streaming else spec.gateway.num_replicas,
                        "max_ongoing_requests": spec.gateway.max_pending_requests,
                    },
                    attention,
                ],
            }
        ],
    }


def serve_config_yaml(spec: ClusterSpec) -> str:
    """`render_serve_config` as YAML text, keys in the order Serve documents them."""
    return yaml.safe_dump(render_serve_config(spec), sort_keys=False)
