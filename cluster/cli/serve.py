"""`mimo serve`: start (or join) a Ray cluster, deploy the application from a `ClusterSpec`, print
where everything is (API, metrics, dashboard) and tear everything down on Ctrl-C.

The spec comes from `--config` (or the built-in default: the embedded tiny model on this machine);
the common settings have flags that override it (`--port`, `--model`, ...). `--print-config`
prints the equivalent Serve config (`serve deploy` compatible), `--spec-template` a commented spec
with every field, and both exit.

A cluster it starts is private: bound to loopback, with Ray's token auth on and a token made for
it (`cluster.serving.ray_auth`); joining one (`--address`) needs that cluster's token."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from cluster.cli.help import DefaultsFormatter
from cluster.spec import DIRECT_STREAMING_ENV, ClusterSpec

DASHBOARD_PORT = 8265  # Ray's default; another free port when it is taken


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI API on Ray Serve (default: the embedded tiny model, here)",
        description="Serve the OpenAI API from a cluster spec. Flags override the spec's fields.",
        formatter_class=DefaultsFormatter,
    )
    d = ClusterSpec()
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        help="cluster spec YAML (default: the built-in spec, `--spec-template` prints it)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"HTTP port of the API, gateway.port (default: the spec's, built-in {d.gateway.port})",
    )
    serve.add_argument(
        "--host",
        default=None,
        help="HTTP bind address, gateway.host; off loopback needs --api-keys-file "
        f"(default: the spec's, built-in {d.gateway.host})",
    )
    serve.add_argument(
        "--model",
        default=None,
        help="checkpoint directory, model.path (default: the spec's, built-in the embedded tiny model)",
    )
    serve.add_argument(
        "--api-keys-file",
        default=None,
        help="file of API keys, one per line, gateway.api_keys_file (default: the spec's, built-in none: no auth)",
    )
    serve.add_argument(
        "--attention-replicas",
        type=int,
        default=None,
        help=f"attention replicas at start, attention.num_replicas (default: the spec's, built-in {d.attention.num_replicas})",
    )
    serve.add_argument(
        "--expert-shards",
        type=int,
        default=None,
        help=f"expert shard actors, experts.num_shards (default: the spec's, built-in {d.experts.num_shards})",
    )
    serve.add_argument(
        "--mtp",
        type=int,
        default=None,
        help=f"MTP draft tokens per step, 0-3, engine.num_mtp_drafts (default: the spec's, built-in {d.engine.num_mtp_drafts})",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Ray's metrics export port, observability.metrics_port; a free one if taken "
        f"(default: the spec's, built-in {d.observability.metrics_port})",
    )
    serve.add_argument(
        "--no-dashboard",
        action="store_true",
        help="do not start Ray's dashboard (saves ~0.3 GB and a second)",
    )
    serve.add_argument(
        "--address", default=None, help="Ray cluster to join (default: none, start a private one here)"
    )
    serve.add_argument(
        "--ray-token-file",
        type=Path,
        default=None,
        help="with --address: file holding the cluster's Ray auth token (default: RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)",
    )
    serve.add_argument("--print-config", action="store_true", help="print the Serve config YAML and exit")
    serve.add_argument(
        "--spec-template", action="store_true", help="print a commented spec with every field and exit"
    )
    serve.set_defaults(func=run)


def spec_of(args: argparse.Namespace) -> ClusterSpec:
    """The spec file (or the default) with the flags' overrides; a bad value raises SpecError
    naming the spec field."""
    spec = ClusterSpec.load(args.config)
    data: dict[str, Any] = spec.model_dump(mode="json")
    overrides = {
        ("gateway", "port"): args.port,
        ("gateway", "host"): args.host,
        ("gateway", "api_keys_file"): args.api_keys_file,
        ("model", "path"): args.model,
        ("experts", "num_shards"): args.expert_shards,
        ("engine", "num_mtp_drafts"): args.mtp,
        ("observability", "metrics_port"): args.metrics_port,
    }
    for (section, field), value in overrides.items():
        if value is not None:
            data[section][field] = value
    if args.expert_shards is not None:  # bounds the flag would contradict follow it
        data["experts"]["min_shards"] = data["experts"]["max_shards"] = None
    if args.attention_replicas is not None:
        n = args.attention_replicas
        attention = data["attention"]
        attention.update(
            num_replicas=n,
            min_replicas=min(attention["min_replicas"], n),
            max_replicas=max(attention["max_replicas"], n),
        )
    return ClusterSpec.from_dict(data)


def run(args: argparse.Namespace) -> int:
    if args.spec_template:
        from cluster.cli.spec_template import spec_template

        print(spec_template(), end="")
        return 0
    spec = spec_of(args)
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
        return _serve(spec, args.address, dashboard=not args.no_dashboard)
    finally:
        if token is not None:
            token.remove()


def _serve(spec: ClusterSpec, address: str | None, dashboard: bool) -> int:
    os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
    if spec.gateway.direct_streaming:  # read by Ray at import, and by the cluster started below
        os.environ.update(DIRECT_STREAMING_ENV)
    import ray
    from ray import serve

    from cluster.serving.app import APP_NAME, check_engine_fits, fit_to_machine, required_cpus
    from cluster.serving.deploy import deploy

    check_engine_fits(spec)  # a bad spec fails here, naming the field, before Ray starts
    where: list[tuple[str, str]] = []
    if address:
        ray.init(address=address, log_to_driver=False)
        spec = _fitted(spec, fit_to_machine(spec, ray.cluster_resources().get("CPU", 0.0)), "the cluster")
        where.append(("metrics", f"port {spec.observability.metrics_port} of every node of the cluster"))
    else:  # always a new private cluster, never someone else's that happens to run here
        spec = _fitted(spec, fit_to_machine(spec, os.cpu_count() or 1), "this machine")
        # logical CPUs are scheduling tokens: reserve enough for the spec even on a small machine
        num_cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(spec)))
        metrics_port = _port_or_free(spec.observability.metrics_port, "metrics")
        dashboard_port = _port_or_free(DASHBOARD_PORT, "dashboard") if dashboard else None
        context = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            log_to_driver=False,
            logging_level=logging.WARNING,  # what it would say at INFO, the lines below say
            _node_ip_address="127.0.0.1",
            _metrics_export_port=metrics_port,
        )
        where.append(
            ("metrics", f"http://127.0.0.1:{metrics_port}/metrics  (ours: ray_mimo_*; Ray's: ray_*)")
        )
        if dashboard:
            where.append(("dashboard", f"http://{context.dashboard_url}  (Ray, with the cluster's token)"))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        deploy(spec)
        g = spec.gateway
        lines = [f"mimo serve: {spec.model.served_name} at http://{g.host}:{g.port}/v1"]
        lines += [f"  {name + ':':<11}{value}" for name, value in where]
        lines.append(f"  {'stop:':<11}Ctrl-C (or kill -INT {os.getpid()})")
        print("\n".join(lines), flush=True)
        stop.wait()
    finally:
        print("mimo serve: shutting down", flush=True)
        _quiet_shutdown_logs()
        if address:
            serve.delete(APP_NAME)  # a shared cluster keeps its other applications
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _port_or_free(port: int, what: str) -> int:
    """`port` if nothing listens on it on loopback, else a free one (said on stdout)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = int(s.getsockname()[1])
    print(f"mimo serve: {what} port {port} is taken; using {free}", flush=True)
    return free


def _quiet_shutdown_logs() -> None:
    """Ray and Serve report their own teardown (actors killed, the controller's graceful-shutdown
    task retried); at a shutdown we asked for, that is noise, not news."""
    from cluster.serving.ray_private import mute_raylet_errors_on_driver

    mute_raylet_errors_on_driver()
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _fitted(spec: ClusterSpec, fitted: ClusterSpec, where: str) -> ClusterSpec:
    if fitted.attention.max_replicas != spec.attention.max_replicas:
        print(
            f"mimo serve: attention.max_replicas {fitted.attention.max_replicas} (what {where}'s CPUs "
            "hold; set it in the spec to choose)",
            flush=True,
        )
    return fitted
