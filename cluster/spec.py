"""`ClusterSpec`: the one configuration of a deployment, loaded from YAML.

The local `mimo serve`, the Ray Serve config (`mimo serve --print-config`) and the Kubernetes
manifests (`mimo render k8s`) are all rendered from it. Every field is described; unknown fields are
rejected (`extra="forbid"`), and a bad value raises `SpecError` naming the field's dotted path.
This file holds the serving sections (model, engine, attention, experts, router, gateway) and the
whole; the gateway's is in `spec_gateway.py`, the operations sections (observability, autoscaling,
Kubernetes) in `spec_operations.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cluster.spec_base import SpecError, SpecSection
from cluster.spec_gateway import GatewaySpec
from cluster.spec_operations import AutoscalingSpec, KubernetesSpec, ObservabilitySpec
from replicas.engine.engine_config import EngineConfig
from router.policy import RouterConfig

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "mimo-tiny"


# What direct streaming needs in every process of the Ray cluster before Serve starts (Ray 2.60 env
# switches): HAProxy instead of Serve's proxy, the request body forwarded to the route chooser, and
# the client's Authorization header forwarded with it (HAProxy forwards one client header, Serve's
# "session id" header, whose name this sets), so the chooser hashes with the tenant's cache salt.
DIRECT_STREAMING_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
    "RAY_SERVE_SESSION_ID_HEADER_KEY": "authorization",
}


class ModelSpec(SpecSection):
    """The checkpoint served and how it is named and loaded."""

    path: str = Field(
        str(EMBEDDED_MODEL), description="checkpoint directory (config.json, safetensors, tokenizer)"
    )
    served_name: str = Field("mimo-tiny", description="model id clients send and /v1/models lists")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype of weights and KV")
    generation_config: Literal["auto", "none"] = Field(
        "auto",
        description="auto: sampling fields a request leaves out take the checkpoint's "
        "generation_config.json values (temperature, top_p, top_k, min_p, repetition_penalty, "
        "max_new_tokens as the max_tokens cap), as vLLM and SGLang do; none: OpenAI's defaults",
    )


_ENGINE = EngineConfig()  # one source for the engine's defaults: the engine's own


class EngineSpec(SpecSection):
    """Each attention replica's engine: KV cache, batching, MTP, threads."""

    block_size: int = Field(
        _ENGINE.block_size, ge=1, description="tokens per KV block (also the prefix-hash block)"
    )
    kv_cache_mib: int = Field(
        _ENGINE.kv_cache_bytes // 2**20, ge=1, description="KV cache budget per attention replica, MiB"
    )
    max_num_seqs: int = Field(
        _ENGINE.max_num_seqs, ge=1, description="most requests running at once per replica"
    )
    max_num_batched_tokens: int = Field(
        _ENGINE.max_num_batched_tokens, ge=16, description="token budget of one engine step"
    )
    max_prefill_chunk: int = Field(
        _ENGINE.max_prefill_chunk, ge=1, description="longest prefill chunk of one request per step"
    )
    long_prefill_chunk: int = Field(
        _ENGINE.long_prefill_chunk,
        ge=0,
        description="in a step with no decode running, a prefill chunk (and the step) may be this "
        "long: fewer steps for a long prompt on an otherwise idle replica (about 10% at 8K-32K "
        "tokens on CPU, benchmarks/NOTES.md); a running decode keeps the short chunk. 0: off",
    )
    max_model_len: int | None = Field(None, ge=2, description="context limit; default the model's")
    num_mtp_drafts: int = Field(0, ge=0, le=3, description="MTP draft tokens per step (0 = off)")
    max_draft_batch: int | None = Field(
        None, ge=1, description="draft only in steps where at most this many sequences sample (none: always)"
    )
    enable_prefix_cache: bool = Field(True, description="reuse KV blocks of equal prefixes")
    stream_interval_ms: float = Field(
        20.0,
        ge=0,
        description="least time between two streamed chunks of a request after its first; the tokens "
        "in between go out together (0: a chunk per engine step)",
    )
    max_queued_requests: int = Field(256, ge=1, description="waiting requests per replica before 503")
    max_queue_wait_s: float | None = Field(
        30.0,
        gt=0,
        description="a request its replica has not started this long after it reached the API ends "
        "with 503 + Retry-After (on every streaming path); prefill does not count, so long prompts "
        "are safe once started; none: no bound in time (the engine library's default, for offline "
        "batches)",
    )
    threads: int = Field(
        1,
        ge=1,
        description="torch intra-op threads per replica; the cluster runs OMP_WAIT_POLICY=PASSIVE (idle "
        "threads sleep, so they never starve a co-located shard), which makes each parallel op of a "
        "multi-thread replica pay a wake-up: 2 threads decoded one sequence 3x slower than 1 on 2 cores",
    )


class AttentionSpec(SpecSection):
    """The attention replica pool (dense path and KV cache), Serve-autoscaled."""

    num_replicas: int = Field(
        1,
        ge=1,
        description="attention replicas at start (data-parallel ranks); one by default: on a small "
        "host a second engine only shares the same cores (2 cores: 109/392/645 output tok/s at "
        "1/8/32 clients with one, 79/256/399 with two); autoscaling adds replicas where CPUs allow",
    )
    min_replicas: int = Field(1, ge=1, description="autoscaling lower bound")
    max_replicas: int = Field(4, ge=1, description="autoscaling upper bound")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica; > 0 runs its engine on CUDA")
    max_ongoing_requests: int = Field(128, ge=1, description="Serve's in-flight limit per replica")

    @model_validator(mode="after")
    def _bounds(self) -> AttentionSpec:
        if not self.min_replicas <= self.num_replicas <= self.max_replicas:
            raise ValueError("need min_replicas <= num_replicas <= max_replicas")
        return self


class ExpertsSpec(SpecSection):
    """The expert shard actors that hold the routed experts."""

    num_shards: int = Field(2, ge=1, description="expert shard actors")
    num_redundant: int = Field(0, ge=0, description="extra copies of hot experts (EPLB)")
    transport: Literal["local", "ray", "channel"] = Field(
        "channel",
        description="channel: shared shard actors, reached from replicas on their node over a "
        "shared-memory channel (tens of microseconds per call) and over Ray actor calls from other "
        "nodes; ray: shared shard actors over Ray actor calls only (about a millisecond per call); "
        "local: experts inside each attention replica (no shard processes)",
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per shard")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per shard; > 0 holds its experts on CUDA")
    threads: int = Field(1, ge=1, description="torch intra-op threads per shard")
    keep_fp8: bool = Field(
        True,
        description="the experts of an FP8 checkpoint stay float8 with their block scales in shard "
        "memory (half of bf16's bytes, what `mimo plan` sizes) and are dequantized per call; false "
        "dequantizes at load: twice the memory, a faster decode on CPU (about 1 ms less per 8-row "
        "layer call on the tiny model)",
    )
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD"] = Field(
        "SPREAD", description="placement group strategy for the shards over nodes"
    )
    min_shards: int | None = Field(None, ge=1, description="autoscaling lower bound (default num_shards)")
    max_shards: int | None = Field(None, ge=1, description="autoscaling upper bound (default num_shards)")
    ping_pong: bool = Field(
        False,
        description="split each step's sequences in two micro-batches so one's attention runs while "
        "the other's experts compute (MegaScale-Infer); pays off when shards have cores or GPUs of "
        "their own, not on a small shared host (0.5-0.9x on 2 cores)",
    )
    call_timeout_s: float = Field(
        120.0,
        gt=0,
        description="a shard that answers none of a layer's calls in this time (hung, not dead) fails "
        "that engine step's requests with an error; longer than a shard restart, which is retried",
    )
    eplb_interval_s: float = Field(
        60.0, ge=0, description="how often the expert load balancer may move experts (0 = never)"
    )
    eplb_min_gain: float = Field(
        0.05, ge=0, le=1, description="least balancedness (mean/max) improvement worth a move"
    )

    @property
    def has_shard_actors(self) -> bool:
        """The experts live in shard actors (an expert pool), not inside attention replicas."""
        return self.transport != "local"


class RouterSpec(SpecSection):
    """How the gateway's router places a request: cached prefix against load."""

    policy: Literal["prefix", "round_robin", "power_of_two"] = Field(
        "prefix", description="how the gateway picks an attention replica"
    )
    cost: Literal["time", "blocks"] = Field(
        "time",
        description="time: a replica's expected time to first token in seconds (queue wait + prefill of "
        "the uncached tokens + KV pressure) from its measured step time and prefill rate; blocks: the "
        "older weighted score (prefix_weight, load_weight, kv_weight)",
    )
    default_step_s: float = Field(
        RouterConfig.default_step_s,
        gt=0,
        description="time cost: step time assumed for a replica that has not measured one yet "
        "(calibrated on the tiny model, benchmarks/routing_calibrate.py)",
    )
    default_prefill_tokens_per_s: float = Field(
        RouterConfig.default_prefill_tokens_per_s,
        gt=0,
        description="time cost: prefill rate assumed for a replica that has not measured one yet",
    )
    tie_break: Literal["distinct", "first_block"] = Field(
        "distinct",
        description="equal costs: hash the first block no replica holds (sessions behind one system prompt "
        "spread) or the prompt's first block (the older rule)",
    )
    share_loads: bool = Field(
        True, description="several gateway replicas share their in-flight counts per replica (route board)"
    )
    prefix_weight: float = Field(1.0, ge=0, description="blocks cost: score per cached prefix block")
    load_weight: float = Field(4.0, ge=0, description="blocks cost: score penalty per running+queued request")
    kv_weight: float = Field(8.0, ge=0, description="blocks cost: score penalty per unit of KV usage (0..1)")
    stale_after_s: float = Field(10.0, gt=0, description="replica stats older than this are ignored")
    guess_ttl_s: float = Field(
        10.0,
        ge=0,
        description="a just-routed prompt counts as cached there this long unless the "
        "replica's events confirm it (0: only the replicas' events count)",
    )

    max_routing_wait_s: float = Field(
        30.0, gt=0, description="a request no attention replica has room for within this long gets 503"
    )


class ClusterSpec(SpecSection):
    model: ModelSpec = ModelSpec()
    engine: EngineSpec = EngineSpec()
    attention: AttentionSpec = AttentionSpec()
    experts: ExpertsSpec = ExpertsSpec()
    router: RouterSpec = RouterSpec()
    gateway: GatewaySpec = GatewaySpec()
    observability: ObservabilitySpec = ObservabilitySpec()
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    kubernetes: KubernetesSpec = KubernetesSpec()

    @staticmethod
    def from_dict(data: dict[str, object]) -> ClusterSpec:
        try:
            spec = ClusterSpec.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "spec"
            raise SpecError(field, err["msg"]) from None
        _check_combinations(spec)
        return spec

    @staticmethod
    def load(path: str | Path | None) -> ClusterSpec:
        """The spec in a YAML file, or the default (embedded tiny model on this machine) for None."""
        if path is None:
            return ClusterSpec()
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise SpecError("spec", f"{path} must hold a YAML mapping")
        return ClusterSpec.from_dict(data)


def _check_combinations(spec: ClusterSpec) -> None:
    """Fields valid alone that cannot work together: SpecError naming the field to change."""
    g, x = spec.gateway, spec.experts
    if g.direct_streaming and g.max_queue_wait_s is not None:
        raise SpecError(
            "gateway.max_queue_wait_s",
            "is the gateway relay's bound; with gateway.direct_streaming no gateway relays requests "
            "(unset one of them)",
        )
    if not x.has_shard_actors and (x.num_gpus > 0 or x.num_redundant > 0 or x.ping_pong):
        field = "num_gpus" if x.num_gpus > 0 else "num_redundant" if x.num_redundant > 0 else "ping_pong"
        raise SpecError(
            f"experts.{field}",
            "needs expert shard actors; experts.transport: local runs the experts inside each "
            "attention replica (use channel or ray)",
        )
