"""The cluster spec's operations sections: where metrics go (`ObservabilitySpec`), the autoscaling
policy's targets (`AutoscalingSpec`) and what `mimo render k8s` writes (`KubernetesSpec`)."""

from __future__ import annotations

from pydantic import Field

from cluster.spec_base import SpecSection


class ObservabilitySpec(SpecSection):
    """Where metrics are exported and read."""

    metrics_port: int = Field(8080, ge=1, le=65535, description="Ray's per-node metrics export port")
    prometheus_url: str | None = Field(
        None, description="Prometheus the autoscaler queries (PromQL); none = the replicas' own stats"
    )


class AutoscalingSpec(SpecSection):
    """The application-level autoscaling policy's targets and delays."""

    enabled: bool = Field(True, description="run the application-level autoscaling policy")
    target_kv_usage: float = Field(0.7, gt=0, le=1, description="scale attention up above this KV usage")
    target_waiting_per_replica: float = Field(
        2.0, ge=0, description="queued requests per replica to scale up"
    )
    ttft_slo_ms: float = Field(2000.0, gt=0, description="time-to-first-token SLO (p90)")
    scale_down_kv_usage: float = Field(0.3, ge=0, le=1, description="scale down below this KV usage")
    upscale_delay_s: float = Field(10.0, ge=0, description="condition must hold this long to scale up")
    downscale_delay_s: float = Field(60.0, ge=0, description="condition must hold this long to scale down")
    cooldown_s: float = Field(30.0, ge=0, description="least time between two scaling changes of a pool")
    expert_target_load: float = Field(0.7, gt=0, le=1, description="busy fraction per shard to add shards")


class KubernetesSpec(SpecSection):
    """What `mimo render k8s` writes: image, namespace, pod sizes."""

    namespace: str = Field("mimo", description="namespace of every object")
    image: str = Field("ghcr.io/mimo-serve/mimo-serve:0.1.0", description="container image")
    head_cpu: str = Field("2", description="head pod CPU request")
    head_memory: str = Field("8Gi", description="head pod memory request")
    attention_cpu: str = Field("4", description="attention pod CPU request")
    attention_memory: str = Field("16Gi", description="attention pod memory request")
    attention_gpus: int = Field(0, ge=0, description="GPUs per attention pod")
    expert_cpu: str = Field("4", description="expert pod CPU request")
    expert_memory: str = Field("16Gi", description="expert pod memory request")
    expert_gpus: int = Field(0, ge=0, description="GPUs per expert pod")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict, description="node labels for GPU pods")
    api_key_secret: str = Field("mimo-api-keys", description="Secret holding the API keys file")
    operator_namespace: str = Field(
        "kuberay-system", description="namespace of the KubeRay operator (the only one let to the dashboard)"
    )
    prometheus_namespace: str = Field(
        "monitoring", description="namespace of Prometheus (the only one let to the metrics port)"
    )
    gcs_redis_address: str | None = Field(
        None,
        description="host:port of an external Redis for GCS fault tolerance: running Serve replicas "
        "keep serving while the head pod restarts, and the cluster's state survives it (none: off)",
    )
    gcs_redis_secret: str = Field(
        "mimo-redis", description="Secret whose key 'password' holds that Redis's password"
    )
