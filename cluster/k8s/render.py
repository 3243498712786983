"""Kubernetes objects of a `ClusterSpec`: a KubeRay `RayService` and what runs beside it.

The RayService's `serveConfigV2` is `render_serve_config` of the same spec (as the pod sees it:
bound to 0.0.0.0, the API-key Secret mounted as the keys file), so the local run, the Serve config
and the cluster cannot disagree. Pods are non-root with a read-only root filesystem (Ray writes
under /tmp, an emptyDir), drop every capability and carry requests equal to limits.
"""

from __future__ import annotations

from typing import Any

from cluster.k8s.monitoring import pod_monitor, prometheus_rule
from cluster.serving.serve_config import serve_config_yaml
from cluster.spec import DIRECT_STREAMING_ENV, EMBEDDED_MODEL, ClusterSpec

Obj = dict[str, Any]

NAME = "mimo"  # the RayService; other objects are "mimo-<role>"
APP_LABEL = {"app.kubernetes.io/name": "mimo-serve"}
RAY_VERSION = "2.60.0"
IMAGE_MODEL_DIR = "/app/checkpoints/mimo-tiny"  # where the image holds the embedded tiny model
API_KEYS_DIR = "/etc/mimo/api-keys"
API_KEYS_ITEM = "api-keys"
API_KEYS_FILE = f"{API_KEYS_DIR}/{API_KEYS_ITEM}"
PLACEHOLDER_KEYS = (
    "# Placeholder: replace this Secret before exposing the gateway (see k8s/README.md).\n"
    "mimo-placeholder-key-replace-me\n"
)
SERVICE_ACCOUNT = "mimo-ray"
RUN_AS_ID = 10001  # a high UID/GID that no host account owns
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, DASHBOARD_AGENT_PORT = 6379, 8265, 10001, 52365
GPU_RESOURCE = "nvidia.com/gpu"


def pod_spec(spec: ClusterSpec) -> ClusterSpec:
    """The spec as the pods see it: Serve binds every interface, keys come from the mounted
    Secret, and the embedded model is read from the image rather than from this checkout."""
    data = spec.model_dump(mode="json")
    data["gateway"].update(host="0.0.0.0", api_keys_file=API_KEYS_FILE)
    if data["model"]["path"] == str(EMBEDDED_MODEL):
        data["model"]["path"] = IMAGE_MODEL_DIR
    return ClusterSpec.from_dict(data)


def render_manifests(spec: ClusterSpec) -> list[Obj]:
    """Every object of the deployment, in the order `kubectl apply` can create them."""
    ns = spec.kubernetes.namespace
    return [
        _namespace(ns),
        _meta_obj("v1", "ServiceAccount", SERVICE_ACCOUNT, ns) | {"automountServiceAccountToken": False},
        _secret(spec),
        _gateway_service(spec),
        _network_policy(spec),
        *_disruption_budgets(spec),
        rayservice(spec),
        pod_monitor(spec, _meta_obj("monitoring.coreos.com/v1", "PodMonitor", "mimo-ray-nodes", ns)),
        prometheus_rule(spec, _meta_obj("monitoring.coreos.com/v1", "PrometheusRule", "mimo-alerts", ns)),
    ]


def rayservice(spec: ClusterSpec) -> Obj:
    """The RayService: head, an `attention` worker group and (with Ray-actor experts) `expert`."""
    k = spec.kubernetes
    params = {"metrics-export-port": str(spec.observability.metrics_port)}
    workers = [
        _worker_group(
            spec,
            "attention",
            k.attention_cpu,
            k.attention_memory,
            k.attention_gpus,
            (spec.attention.num_replicas, spec.attention.min_replicas, spec.attention.max_replicas),
        ),
    ]
    if spec.experts.has_shard_actors:
        n = spec.experts.num_shards  # the pool's size is fixed by the spec, so min = max
        workers.append(_worker_group(spec, "expert", k.expert_cpu, k.expert_memory, k.expert_gpus, (n, n, n)))
    cluster: Obj = {
        "rayVersion": RAY_VERSION,
        # Ray's token auth (KubeRay >= 1.5.1): the operator makes a Secret with a random token and
        # hands it to every Ray container (RAY_AUTH_MODE, RAY_AUTH_TOKEN) and to its own calls
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": spec.autoscaling.enabled,
    }
    if k.gcs_redis_address is not None:
        # KubeRay points the GCS at Redis; the head restarts into the same cluster state while
        # worker pods, and the Serve replicas on them, keep serving
        cluster["gcsFaultToleranceOptions"] = {
            "redisAddress": k.gcs_redis_address,
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": k.gcs_redis_secret, "key": "password"}}},
        }
    if spec.autoscaling.enabled:
        cluster["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": int(spec.autoscaling.downscale_delay_s),
            "imagePullPolicy": "Always",
            "resources": _resources("500m", "512Mi", 0),
            "securityContext": _container_security(),
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }
    cluster["headGroupSpec"] = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", **params},
        "template": _pod_template(spec, "head", k.head_cpu, k.head_memory, 0),
    }
    cluster["workerGroupSpecs"] = workers
    obj = _meta_obj("ray.io/v1", "RayService", NAME, k.namespace)
    obj["spec"] = {"serveConfigV2": serve_config_yaml(pod_spec(spec)), "rayClusterConfig": cluster}
    return obj


def _worker_group(
    spec: ClusterSpec, role: str, cpu: str, memory: str, gpus: int, replicas: tuple[int, int, int]
) -> Obj:
    num, low, high = replicas
    return {
        "groupName": role,
        "replicas": num,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {"metrics-export-port": str(spec.observability.metrics_port)},
        "template": _pod_template(spec, role, cpu, memory, gpus),
    }


def _pod_template(spec: ClusterSpec, role: str, cpu: str, memory: str, gpus: int) -> Obj:
    is_head = role == "head"
    ports = [{"name": "serve", "containerPort": spec.gateway.port, "protocol": "TCP"}]
    ports.append({"name": "metrics", "containerPort": spec.observability.metrics_port, "protocol": "TCP"})
    if is_head:
        ports[:0] = [
            {"name": "gcs-server", "containerPort": GCS_PORT, "protocol": "TCP"},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
            {"name": "client", "containerPort": CLIENT_PORT, "protocol": "TCP"},
        ]
    container = {
        "name": "ray-head" if is_head else "ray-worker",
        "image": spec.kubernetes.image,
        "imagePullPolicy": "Always",
        "ports": ports,
        "env": [
            {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
            # Ray reads these at start, in every process: HAProxy, body and key to the route chooser
            *(
                [{"name": k, "value": v} for k, v in DIRECT_STREAMING_ENV.items()]
                if spec.gateway.direct_streaming
                else []
            ),
        ],
        "resources": _resources(cpu, memory, gpus),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},  # Ray's object store; the default is 64 MiB
            {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True},
        ],
    }
    pod: Obj = {
        "serviceAccountName": SERVICE_ACCOUNT,
        # the head's autoscaler sidecar scales worker groups through the Kubernetes API
        "automountServiceAccountToken": is_head and spec.autoscaling.enabled,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_ID,
            "runAsGroup": RUN_AS_ID,
            "fsGroup": RUN_AS_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": memory}},
            {
                "name": "api-keys",
                "secret": {"secretName": spec.kubernetes.api_key_secret, "defaultMode": 0o440},
            },
        ],
    }
    if gpus:
        if spec.kubernetes.gpu_node_selector:
            pod["nodeSelector"] = dict(spec.kubernetes.gpu_node_selector)
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    labels = {**APP_LABEL, "app.kubernetes.io/component": role}
    return {"metadata": {"labels": labels, "annotations": _scan_skips(spec, is_head)}, "spec": pod}


def _scan_skips(spec: ClusterSpec, is_head: bool) -> dict[str, str]:
    """Checkov findings that are accepted on purpose, each with its reason (read by the scan)."""
    reasons = [
        "CKV_K8S_8=KubeRay injects a Ray-aware liveness probe",
        "CKV_K8S_9=KubeRay injects a Ray-aware readiness probe",
    ]
    if "@sha256:" not in spec.kubernetes.image:
        reasons.append("CKV_K8S_43=pinned by release tag; set kubernetes.image to name@sha256:<digest>")
    if is_head and spec.autoscaling.enabled:
        reasons.append("CKV_K8S_38=the Ray autoscaler sidecar needs the API token")
    return {f"checkov.io/skip{i + 1}": r for i, r in enumerate(reasons)}


def _resources(cpu: str, memory: str, gpus: int) -> Obj:
    amounts: dict[str, str | int] = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts[GPU_RESOURCE] = gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container_security() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _meta_obj(api_version: str, kind: str, name: str, namespace: str | None) -> Obj:
    meta: Obj = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = dict(APP_LABEL)
    return {"apiVersion": api_version, "kind": kind, "metadata": meta}


def _namespace(ns: str) -> Obj:
    obj = _meta_obj("v1", "Namespace", ns, None)
    # Pod Security Admission rejects any pod of this namespace that breaks the restricted profile
    obj["metadata"]["labels"] |= {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    return obj


def _secret(spec: ClusterSpec) -> Obj:
    obj = _meta_obj("v1", "Secret", spec.kubernetes.api_key_secret, spec.kubernetes.namespace)
    obj["type"] = "Opaque"
    obj["stringData"] = {API_KEYS_ITEM: PLACEHOLDER_KEYS}
    return obj


def _gateway_service(spec: ClusterSpec) -> Obj:
    """The one entry point: the Serve proxies' HTTP port on pods whose proxy is up (KubeRay
    labels those `ray.io/serve: "true"`)."""
    obj = _meta_obj("v1", "Service", "mimo-gateway", spec.kubernetes.namespace)
    obj["spec"] = {
        "type": "ClusterIP",
        "selector": {**APP_LABEL, "ray.io/serve": "true"},
        "ports": [{"name": "http", "port": spec.gateway.port, "targetPort": "serve", "protocol": "TCP"}],
    }
    return obj


def _network_policy(spec: ClusterSpec) -> Obj:
    """Ray's ports only between the deployment's own pods; the gateway port from anywhere; the
    metrics port from Prometheus and the dashboard from the KubeRay operator, each only from its
    own namespace (a peer names both selectors, so a pod elsewhere cannot get in by its label)."""
    k = spec.kubernetes

    def peer(namespace: str, name: str) -> Obj:
        return {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": name}},
        }

    obj = _meta_obj("networking.k8s.io/v1", "NetworkPolicy", "mimo-serve", k.namespace)
    obj["spec"] = {
        "podSelector": {"matchLabels": dict(APP_LABEL)},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": dict(APP_LABEL)}}]},
            {"ports": [{"protocol": "TCP", "port": spec.gateway.port}]},
            {
                "from": [peer(k.prometheus_namespace, "prometheus")],
                "ports": [{"protocol": "TCP", "port": spec.observability.metrics_port}],
            },
            {
                "from": [peer(k.operator_namespace, "kuberay-operator")],
                "ports": [
                    {"protocol": "TCP", "port": DASHBOARD_PORT},
                    {"protocol": "TCP", "port": DASHBOARD_AGENT_PORT},
                ],
            },
        ],
    }
    return obj


def _disruption_budgets(spec: ClusterSpec) -> list[Obj]:
    """At most one attention pod and one expert pod drained at a time."""
    roles = ["attention"] + (["expert"] if spec.experts.has_shard_actors else [])
    budgets = []
    for role in roles:
        obj = _meta_obj("policy/v1", "PodDisruptionBudget", f"mimo-{role}", spec.kubernetes.namespace)
        labels = {**APP_LABEL, "app.kubernetes.io/component": role}
        obj["spec"] = {"maxUnavailable": 1, "selector": {"matchLabels": labels}}
        budgets.append(obj)
    return budgets
