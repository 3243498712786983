"""`render_serve_config`: a config `serve deploy` accepts (Ray's own schema), carrying the spec."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.cli.main import main
from cluster.serving.serve_config import (
    APP_NAME,
    ATTENTION,
    GATEWAY,
    IMPORT_PATH,
    ROUTE_CHOOSER,
    render_serve_config,
)
from cluster.spec import ClusterSpec


def _validated(config: dict) -> dict:
    # Serve ignores unknown keys for forward compatibility; dumping only what was set and
    # comparing catches a misspelt key that Serve would silently drop.
    schema = ServeDeploySchema.model_validate(config)
    return schema.model_dump(mode="json", exclude_unset=True)


@pytest.mark.parametrize("autoscaling", [True, False])
def test_config_passes_rays_schema_with_nothing_ignored(autoscaling: bool) -> None:
    """Catches configs `serve deploy` rejects (host/port inside the app, num_replicas beside
    autoscaling) and keys Serve would silently ignore."""
    spec = ClusterSpec.from_dict({"autoscaling": {"enabled": autoscaling}, "gateway": {"num_replicas": 2}})
    config = render_serve_config(spec)
    assert _validated(config) == config
    app = config["applications"][0]
    assert (app["name"], app["route_prefix"], app["import_path"]) == (
        "mimo",
        "/",
        "cluster.serving.app:app_builder",
    )
    gateway, attention = app["deployments"]
    assert gateway == {"name": "Gateway", "num_replicas": 2, "max_ongoing_requests": 512}
    expected = {"name": "Attention", "max_ongoing_requests": 128, "max_queued_requests": 256}
    assert attention == (expected if autoscaling else expected | {"num_replicas": 1})


def test_args_rebuild_the_same_spec() -> None:
    """Catches a spec value lost on its way through the config (the app is built from args)."""
    spec = ClusterSpec.from_dict({"engine": {"num_mtp_drafts": 2}, "router": {"policy": "round_robin"}})
    config = render_serve_config(spec)
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    round_tripped = yaml.safe_load(yaml.safe_dump(config))
    assert ClusterSpec.model_validate(round_tripped["applications"][0]["args"]["spec"]) == spec


def test_names_match_the_application() -> None:
    """Catches the config naming an application, builder or deployment the code does not have."""
    app = importlib.import_module("cluster.serving.app")
    module, attr = IMPORT_PATH.split(":")
    assert module == "cluster.serving.app" and callable(getattr(app, attr))
    assert app.APP_NAME == APP_NAME
    assert app.__file__ is not None
    source = Path(app.__file__).read_text()
    assert f'name="{GATEWAY}"' in source and f'name="{ATTENTION}"' in source


def test_direct_streaming_config_names_the_deployments_the_application_builds() -> None:
    """Catches a direct-streaming config naming the Gateway (which that application does not have:
    `serve deploy` would fail) or an application whose ingress is not the attention deployment
    with the route chooser beside it (HAProxy would have nothing to ask)."""
    from cluster.serving.app import build_application

    spec = ClusterSpec.from_dict({"gateway": {"direct_streaming": True}, "autoscaling": {"enabled": False}})
    config = render_serve_config(spec)
    assert _validated(config) == config
    assert [d["name"] for d in config["applications"][0]["deployments"]] == [ROUTE_CHOOSER, ATTENTION]
    app = build_application(spec)
    assert app._bound_deployment.name == ATTENTION
    assert app._ingress_request_router is not None
    assert app._ingress_request_router._bound_deployment.name == ROUTE_CHOOSER
    relay = build_application(ClusterSpec.from_dict({"autoscaling": {"enabled": False}}))
    assert relay._bound_deployment.name == GATEWAY and relay._ingress_request_router is None
    # requests leave through HAProxy, never through the router's handle: it must count load from
    # the replicas' reports (with in-flight counts that never end, sessions drift off their caches)
    from cluster.serving.app import _router_config

    assert _router_config(spec).request_router_kwargs["load_source"] == "reports"
    assert _router_config(ClusterSpec()).request_router_kwargs["load_source"] == "handle"


def test_print_config_prints_this_config(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches `mimo serve --print-config` printing anything but the rendered config."""
    assert main(["serve", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == render_serve_config(ClusterSpec())


def _deployment_names(app: object) -> set[str]:
    """Every deployment bound anywhere under `app` (through init args and the ingress router)."""
    from ray.serve import Application

    names: set[str] = set()
    pending, seen = [app], set()
    while pending:
        node = pending.pop()
        if isinstance(node, Application) and id(node) not in seen:  # the chooser binds its ingress
            seen.add(id(node))
            names.add(node._bound_deployment.name)
            pending += [*node._bound_deployment.init_args, *node._bound_deployment.init_kwargs.values()]
            if node._ingress_request_router is not None:
                pending.append(node._ingress_request_router)
    return names


@pytest.mark.parametrize(
    ("gateway", "shared"),
    [
        ({"requests_per_minute": 60, "direct_streaming": True}, True),  # every replica serves the API
        ({"tokens_per_minute": 6000, "num_replicas": 2}, True),  # two gateways
        ({"requests_per_minute": 60}, False),  # one gateway: exact in its own process
        ({"direct_streaming": True}, False),  # no limits: nothing to share
    ],
)
def test_rate_limits_are_shared_when_several_processes_serve_the_api(gateway: dict, shared: bool) -> None:
    """Catches per-key limits kept per process where several processes answer the API (a key
    would get its limit once per gateway or attention replica), and a store call on every request
    where one process answers alone."""
    from cluster.serving.app import build_application
    from cluster.serving.shared_limits import RATE_LIMITS

    spec = ClusterSpec.from_dict({"gateway": gateway, "autoscaling": {"enabled": False}})
    assert (RATE_LIMITS in _deployment_names(build_application(spec))) == shared


def test_router_spec_options_reach_the_router() -> None:
    """Catches a router option in the spec that the served router never gets (the spec would lie)."""
    from cluster.serving.app import _router_config
    from router.policy import RouterConfig

    router = {
        "cost": "blocks",
        "tie_break": "first_block",
        "share_loads": False,
        "default_step_s": 0.02,
        "default_prefill_tokens_per_s": 1000.0,
        "prefix_weight": 2.0,
    }
    spec = ClusterSpec.from_dict({"router": router, "autoscaling": {"enabled": False}})
    config = RouterConfig.from_kwargs(_router_config(spec).request_router_kwargs)
    assert {name: getattr(config, name) for name in router} == router
    default = RouterConfig.from_kwargs(_router_config(ClusterSpec()).request_router_kwargs)
    assert (default.cost, default.tie_break, default.share_loads) == ("time", "distinct", True)
    assert default.default_step_s == RouterConfig().default_step_s
