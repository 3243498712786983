"""`mimo serve`: start (or join) a Ray cluster, deploy the application from a `ClusterSpec`, print
the URL, and tear everything down on Ctrl-C. `--print-config` prints the equivalent Serve config
(`serve deploy` compatible) and exits.

A cluster it starts is private: bound to loopback, with Ray's token auth on and a token made for
it (`cluster.serving.ray_auth`); joining one (`--address`) needs that cluster's token."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from pathlib import Path

from cluster.spec import DIRECT_STREAMING_ENV, ClusterSpec


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve the OpenAI API on Ray Serve (default: the tiny model here)")
    serve.add_argument("--config", type=Path, default=None, help="cluster spec YAML (default: built-in)")
    serve.add_argument("--address", default=None, help="Ray cluster to join (default: start one here)")
    serve.add_argument(
        "--ray-token-file",
        type=Path,
        default=None,
        help="with --address: file holding the cluster's Ray auth token (default: RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)",
    )
    serve.add_argument("--print-config", action="store_true", help="print the Serve config YAML and exit")
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = ClusterSpec.load(args.config)
    if args.print_config:
        from cluster.serving.serve_config import serve_config_yaml

        print(serve_config_yaml(spec), end="")
        return 0
    from cluster.serving.ray_auth import RayAuthError, new_cluster_token, use_join_token

    token = None
    try:
        if args.address is None:
            # a private single-machine cluster: loopback where Ray lets us choose, a token everywhere
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            token = new_cluster_token()
        else:
            use_join_token(args.ray_token_file)
    except RayAuthError as e:
        print(f"mimo serve: {e}", file=sys.stderr)
        return 2
    try:
        return _serve(spec, args.address)
    finally:
        if token is not None:
            token.remove()


def _serve(spec: ClusterSpec, address: str | None) -> int:
    os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
    if spec.gateway.direct_streaming:  # read by Ray at import, and by the cluster started below
        os.environ.update(DIRECT_STREAMING_ENV)
    import ray
    from ray import serve

    from cluster.serving.app import APP_NAME, check_engine_fits, fit_to_machine, required_cpus
    from cluster.serving.deploy import deploy

    check_engine_fits(spec)  # a bad spec fails here, naming the field, before Ray starts
    if address:
        ray.init(address=address, log_to_driver=False)
        spec = _fitted(spec, fit_to_machine(spec, ray.cluster_resources().get("CPU", 0.0)), "the cluster")
    else:  # always a new private cluster, never someone else's that happens to run here
        spec = _fitted(spec, fit_to_machine(spec, os.cpu_count() or 1), "this machine")
        # logical CPUs are scheduling tokens: reserve enough for the spec even on a small machine
        num_cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(spec)))
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        deploy(spec)
        print(
            f"mimo serve: {spec.model.served_name} at http://{spec.gateway.host}:{spec.gateway.port}/v1",
            flush=True,
        )
        stop.wait()
    finally:
        print("mimo serve: shutting down", flush=True)
        if address:
            serve.delete(APP_NAME)  # a shared cluster keeps its other applications
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _fitted(spec: ClusterSpec, fitted: ClusterSpec, where: str) -> ClusterSpec:
    if fitted.attention.max_replicas != spec.attention.max_replicas:
        print(
            f"mimo serve: attention.max_replicas {fitted.attention.max_replicas} (what {where}'s CPUs "
            "hold; set it in the spec to choose)",
            flush=True,
        )
    return fitted
