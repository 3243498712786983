"""Direct streaming, routing side: the ingress request router HAProxy asks before it forwards a
request (Ray Serve's contract: `POST /internal/route` with the client's body, answered with the
chosen replica's address and actor name). A replica id HAProxy does not know sends the request
through Serve's fallback proxy, but an error answer here makes HAProxy answer the client 503 (seen
with Ray 2.60), so the chooser routes every body, even one it cannot render (by load alone).

The choice is our prefix-aware router's (`router.serve_adapter`, run by the Attention handle's
`choose_replica` without sending anything): the body is rendered and tokenized as the replica will
(`gateway.routing_prompt`), hashed, and scored against the replicas' reports. Since requests then
bypass the handle, the router counts load from the reports plus what it routed since each
(`RouterConfig.load_source = "reports"`). With API keys, HAProxy forwards the client's
Authorization header here (`cluster.spec.DIRECT_STREAMING_ENV` names it Serve's session header) and
the prompt is hashed with the cache salt that key's tenant has (`gateway.auth.claimed_cache_salt`:
one hash, no key file; the replica authenticates). A wrong or missing key's prompt matches no
cached block, so it is routed by load, and its replica answers 401.
"""

# No `from __future__ import annotations`: Serve's class-based FastAPI view needs the real `Request`
# annotation on `route` (as a string, FastAPI takes it for a query parameter and answers 422).
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.spec import ClusterSpec

route_app = FastAPI()


@serve.ingress(route_app)
class RouteChooser:
    def __init__(self, spec: ClusterSpec, attention: DeploymentHandle) -> None:
        from mimo.tokenizer import Tokenizer

        self.spec = spec
        self.tokenizer = Tokenizer.from_dir(self.spec.model.path)
        self.attention = attention
        self.keyed = self.spec.gateway.api_keys_file is not None  # else every tenant shares the cache

    @route_app.post("/internal/route")
    async def route(self, request: Request) -> dict[str, Any]:
        from cluster.serving.ray_private import choose_without_reserving, replica_endpoint
        from gateway.auth import claimed_cache_salt
        from gateway.routing_prompt import routing_prompt
        from protocol.messages import GenerateRequest
        from protocol.sampling import SamplingParams

        token_ids = routing_prompt(await request.body(), self.tokenizer, self.spec.gateway.default_thinking)
        salt = claimed_cache_salt(request.headers.get("authorization")) if self.keyed else None
        # what the router reads of a request: its prompt and tenant (nothing is generated here)
        probe = GenerateRequest("route-choice", token_ids, SamplingParams(), salt)
        async with choose_without_reserving(self.attention, probe) as replica:
            host, port, replica_id = replica_endpoint(replica)
            return {"host": host, "port": port, "replica_id": replica_id}
