"""The one file that touches Ray Serve's private APIs (Ray 2.60); each use is a small function here
with the reason it has no public equivalent. A Ray upgrade that moves one breaks this file only.

- `start_serve`: `serve.start` cannot take the HTTP options of a declarative deploy; `serve deploy`
  and KubeRay go through `serve_start(...).deploy_apps(config)`, the only path that applies an
  application-level autoscaling policy.
- `own_request_context`: the internal request id Serve's router keys pending requests by.
- `choose_without_reserving` / `replica_endpoint`: what Ray's own ingress route chooser does for
  HAProxy (choose a replica without sending, read its HTTP endpoint).
- `with_ingress_request_router`: Ray Serve LLM's direct-streaming hook on an application.
- `mute_raylet_errors_on_driver`: the driver's echo of errors the raylets publish, which has no
  switch (`log_to_driver=False` leaves it on).
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ray.serve import Application
from ray.serve.handle import DeploymentHandle


def start_serve(host: str, port: int, proxy_location: str) -> Any:
    """Serve's controller client, started with these HTTP options (a no-op if Serve runs)."""
    from ray.serve._private.api import serve_start

    return serve_start(http_options={"host": host, "port": port}, proxy_location=proxy_location)


def own_request_context(request_id: str) -> contextvars.Context:
    """A copy of this task's context in which Serve's request context carries `request_id` as its
    internal id. A handle call otherwise inherits the HTTP request's, and Serve's router keys
    pending requests by it: the n sub-requests of one API call shared it, and its routing loop,
    matching every chosen replica to the first of them, spun forever."""
    from ray.serve import context as serve_context

    copied = contextvars.copy_context()
    copied.run(serve_context._set_request_context, _internal_request_id=request_id)
    return copied


@asynccontextmanager
async def choose_without_reserving(handle: DeploymentHandle, *args: Any) -> AsyncIterator[Any]:
    """The replica `handle`'s router picks for a call with `args`, nothing sent and no slot held
    (the request goes out through HAProxy). Yields Serve's running-replica wrapper."""
    async with handle.choose_replica(*args, _reserve=False) as chosen:
        yield chosen._replica


def replica_endpoint(replica: Any) -> tuple[str, int, str]:
    """(host, port, full replica id) of a chosen replica's own HTTP server."""
    endpoint = replica.backend_http_endpoint
    if endpoint is None:
        raise RuntimeError(f"replica {replica.replica_id} serves no HTTP endpoint")
    host, port = endpoint
    return str(host), int(port), str(replica.replica_id.to_full_id_str())


def with_ingress_request_router(app: Application, chooser: Application) -> Application:
    """`app` fronted by HAProxy, which asks `chooser` where each request goes."""
    routed: Application = app._with_ingress_request_router(chooser)
    return routed


def mute_raylet_errors_on_driver() -> None:
    """From now on this driver drops the errors raylets publish instead of printing them. For a
    shutdown we asked for: Serve's own teardown kills its controller while the controller's
    `graceful_shutdown` task is still retried, and the raylet's report of that ("There are infinite
    retries remaining") is printed in colour to the user as if something had gone wrong."""
    import ray._private.worker as ray_worker

    echo = ray_worker.print_to_stdstream

    def echo_all_but_raylet(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            echo(data, ignore_prefix)

    ray_worker.print_to_stdstream = echo_all_but_raylet
