"""The Kubernetes manifests: the committed `k8s/` tree is a fresh render, both overlays build
(with kubectl where present, else the tested kustomize subset), every object validates (built-in
kinds strictly, custom resources against the vendored CRDs), checkov finds nothing, and spec
values reach the objects."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kv
import pytest
import yaml

from cluster.cli.main import main
from cluster.k8s.render import API_KEYS_FILE, IMAGE_MODEL_DIR, RAY_VERSION, pod_spec, render_manifests
from cluster.k8s.tree import OVERLAYS, apply_overlay, json_patch, render_tree
from cluster.serving.serve_config import render_serve_config
from cluster.spec import ClusterSpec
from tests.k8s.crd_schema import K8S_VERSION, crd_errors
from tests.k8s.kustomize_lite import apply_json_patch, build

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CHECKOV = ROOT / ".venv" / "checkov" / "bin" / "checkov"
FOLDERS = ["base", "overlays/cpu-dev", "overlays/gpu-prod"]
CRD_GROUPS = ("ray.io/", "monitoring.coreos.com/")


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return (obj["kind"], obj["metadata"]["name"])


def _expected(folder: str) -> list[dict[str, Any]]:
    spec = ClusterSpec()
    if folder.startswith("overlays/"):
        spec = apply_overlay(spec, folder.split("/")[1])
    return sorted(render_manifests(spec), key=_key)


def _by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _groups(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def test_committed_tree_is_a_fresh_render() -> None:
    """Catches k8s/ drifting from the renderer or the spec defaults: regenerate it with
    `mimo render k8s --out k8s` (and no hand edits, which the next render would lose)."""
    tree = render_tree(ClusterSpec())
    committed = {
        str(p.relative_to(K8S)): p.read_text()
        for sub in ("base", "overlays")
        for p in sorted((K8S / sub).rglob("*"))
        if p.is_file()
    }
    assert sorted(committed) == sorted(tree)
    for rel, text in tree.items():
        assert committed[rel] == text, f"k8s/{rel} is stale: run `mimo render k8s --out k8s`"


@pytest.mark.parametrize("folder", FOLDERS)
def test_kustomize_subset_builds_each_folder_into_the_spec_render(folder: str) -> None:
    """Catches an overlay's patches not turning the base into the overlay's spec (a wrong JSON
    pointer, an unescaped `nvidia.com/gpu` key, a lost operation)."""
    assert sorted(build(K8S / folder), key=_key) == _expected(folder)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("folder", FOLDERS)
def test_kubectl_kustomize_equals_the_subset(folder: str) -> None:
    """Catches the Python kustomize subset disagreeing with real kustomize (patch semantics,
    resource loading), which would make the checks above prove nothing."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / folder)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert sorted(yaml.safe_load_all(out), key=_key) == sorted(build(K8S / folder), key=_key)


def test_json_patch_round_trip_escapes_keys_and_handles_lists() -> None:
    """Catches patch paths that break on keys holding '/' or '~' and list-length changes."""
    old = {"a": {"nvidia.com/gpu": 1, "x~y": 2, "gone": 3}, "l": [1, 2], "m": [{"k": 1}]}
    new = {"a": {"nvidia.com/gpu": 2, "x~y": 2, "new": {"z": 1}}, "l": [1, 2, 3], "m": [{"k": 5}]}
    ops = json_patch(old, new)
    assert ops == [
        {"op": "remove", "path": "/a/gone"},
        {"op": "replace", "path": "/a/nvidia.com~1gpu", "value": 2},
        {"op": "add", "path": "/a/new", "value": {"z": 1}},
        {"op": "replace", "path": "/l", "value": [1, 2, 3]},
        {"op": "replace", "path": "/m/0/k", "value": 5},
    ]
    assert apply_json_patch(old, ops) == new


@pytest.mark.parametrize("folder", FOLDERS)
def test_builtin_kinds_validate_strictly(folder: str) -> None:
    """Catches misspelt or misplaced fields and wrong types in built-in objects (kubectl would
    reject them, or worse, a lenient server would drop them)."""
    builtin = [o for o in build(K8S / folder) if not o["apiVersion"].startswith(CRD_GROUPS)]
    assert sorted(o["kind"] for o in builtin) == sorted(
        ["Namespace", "ServiceAccount", "Secret", "Service", "NetworkPolicy"] + ["PodDisruptionBudget"] * 2
    )
    for obj in builtin:
        assert kv.validate(obj, K8S_VERSION, strict=True) == "1.32"


@pytest.mark.parametrize("folder", FOLDERS)
def test_custom_resources_validate_against_the_vendored_crds(folder: str) -> None:
    """Catches RayService / PodMonitor / PrometheusRule fields the CRDs do not have (the API
    server would prune them silently) and wrong types."""
    custom = [o for o in build(K8S / folder) if o["apiVersion"].startswith(CRD_GROUPS)]
    assert sorted(o["kind"] for o in custom) == ["PodMonitor", "PrometheusRule", "RayService"]
    for obj in custom:
        assert crd_errors(obj) == [], obj["kind"]


def test_crd_validation_is_strict() -> None:
    """Catches a validator that accepts anything: a misspelt field, a duplicate container and a
    string where an integer belongs must each be reported."""
    rayservice = copy.deepcopy(_by_kind(render_manifests(ClusterSpec()), "RayService")[0])
    group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["replica"] = 1
    group["minReplicas"] = "1"
    containers = group["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))
    errors = crd_errors(rayservice)
    assert len(errors) == 3
    assert any("'replica' was unexpected" in e for e in errors)
    assert any("minReplicas: '1' is not of type 'integer'" in e for e in errors)
    assert any("duplicate list-map key" in e for e in errors)


def _lift_pods(objs: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """checkov does not look inside custom resources, so each Ray pod template becomes a Pod."""
    rayservice = _by_kind(objs, "RayService")[0]
    pods = []
    for role, group in _groups(rayservice).items():
        meta = {"name": f"{prefix}-{role}", "namespace": rayservice["metadata"]["namespace"]}
        template = copy.deepcopy(group["template"])
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": meta | template["metadata"],
                "spec": template["spec"],
            }
        )
    return pods


def test_checkov_finds_nothing_and_skips_only_the_justified(tmp_path: Path) -> None:
    """Catches insecure pod settings (root, writable root filesystem, capabilities, missing
    limits, no NetworkPolicy, default service account...) in every folder's output, and skips
    that are not documented. A deliberately insecure canary pod proves the scan ran."""
    assert CHECKOV.exists(), "run `bash scripts/setup` (installs checkov into .venv/checkov)"
    for i, folder in enumerate(FOLDERS):
        objs = build(K8S / folder)
        docs = objs + _lift_pods(objs, f"mimo-{i}")
        (tmp_path / f"{i}.yaml").write_text(yaml.safe_dump_all(docs))
    canary = _lift_pods(build(K8S / "base"), "canary")[1]
    del canary["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    (tmp_path / "canary.yaml").write_text(yaml.safe_dump(canary))
    proc = subprocess.run(
        [str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json", "--skip-download"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    results = report["results"]
    failed = sorted((c["check_id"], c["resource"]) for c in results["failed_checks"])
    assert failed == [("CKV_K8S_22", "Pod.mimo.canary-attention")]
    skipped = {(c["check_id"], c["resource"].split(".")[-1]) for c in results["skipped_checks"]}
    expected = {
        (check, f"{prefix}-{role}")
        for prefix in ["canary", "mimo-0", "mimo-1", "mimo-2"]
        for role in ["head", "attention", "expert"]
        for check in ["CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_43"]
        if prefix != "canary" or role == "attention"
    } | {("CKV_K8S_38", f"mimo-{i}-head") for i in range(3)}
    assert skipped == expected
    assert report["summary"]["passed"] > 200


def test_spec_values_reach_the_objects() -> None:
    """Catches renderer fields that ignore the spec: replicas, resources, GPUs, node selector,
    namespace, ports, image and the Secret must all come from it."""
    spec = ClusterSpec.from_dict(
        {
            "attention": {"num_replicas": 3, "min_replicas": 2, "max_replicas": 5},
            "experts": {"num_shards": 6},
            "gateway": {"port": 9000},
            "observability": {"metrics_port": 9100},
            "kubernetes": {
                "namespace": "llm", "image": "reg.example/mimo@sha256:" + "a" * 64,
                "attention_cpu": "7", "attention_memory": "30Gi", "attention_gpus": 2,
                "expert_cpu": "5", "expert_memory": "50Gi", "expert_gpus": 1,
                "gpu_node_selector": {"gpu": "h200"}, "api_key_secret": "keys",
            },
        }
    )  # fmt: skip
    objs = render_manifests(spec)
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"llm"}
    assert _by_kind(objs, "Namespace")[0]["metadata"]["name"] == "llm"
    groups = _groups(_by_kind(objs, "RayService")[0])
    want = {
        "head": (None, "2", "8Gi", None),
        "attention": ((3, 2, 5), "7", "30Gi", 2),
        "expert": ((6, 6, 6), "5", "50Gi", 1),
    }
    for role, (replicas, cpu, memory, gpus) in want.items():
        group = groups[role]
        if replicas is not None:
            assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == replicas
        assert group["rayStartParams"]["metrics-export-port"] == "9100"
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        amounts = {"cpu": cpu, "memory": memory} | ({"nvidia.com/gpu": gpus} if gpus else {})
        assert container["resources"] == {"requests": amounts, "limits": amounts}
        assert container["image"] == spec.kubernetes.image
        assert {p["name"]: p["containerPort"] for p in container["ports"]}.items() >= {
            "serve": 9000, "metrics": 9100
        }.items()  # fmt: skip
        assert pod.get("nodeSelector") == ({"gpu": "h200"} if gpus else None)
        assert ("tolerations" in pod) == bool(gpus)
        assert {"name": "api-keys", "secret": {"secretName": "keys", "defaultMode": 0o440}} in pod["volumes"]
        # a digest-pinned image needs no scan exception
        assert "CKV_K8S_43" not in json.dumps(group["template"]["metadata"]["annotations"])
    assert _by_kind(objs, "Secret")[0]["metadata"]["name"] == "keys"
    assert _by_kind(objs, "Service")[0]["spec"]["ports"][0]["port"] == 9000
    policy_ports = [
        p["port"] for r in _by_kind(objs, "NetworkPolicy")[0]["spec"]["ingress"] for p in r.get("ports", [])
    ]
    assert policy_ports == [9000, 9100, 8265, 52365]


def test_ray_token_auth_on_and_network_policy_peers_pinned_to_their_namespace() -> None:
    """Catches a cluster whose Ray ports (Serve replicas listen on every interface) run without
    token auth, and a NetworkPolicy peer that a pod in any namespace can match by choosing its own
    label (a namespaceSelector of {} or one without a podSelector)."""
    spec = ClusterSpec.from_dict(
        {"kubernetes": {"operator_namespace": "ray-ops", "prometheus_namespace": "obs"}}
    )
    objs = render_manifests(spec)
    cluster = _by_kind(objs, "RayService")[0]["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    for group in _groups(_by_kind(objs, "RayService")[0]).values():
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env.get("RAY_AUTH_MODE") in (None, "token")  # the operator sets it; never "disabled"
    rules = _by_kind(objs, "NetworkPolicy")[0]["spec"]["ingress"]
    outside = [peer for rule in rules for peer in rule.get("from", []) if "namespaceSelector" in peer]
    assert [(p["namespaceSelector"]["matchLabels"], p["podSelector"]["matchLabels"]) for p in outside] == [
        ({"kubernetes.io/metadata.name": "obs"}, {"app.kubernetes.io/name": "prometheus"}),
        ({"kubernetes.io/metadata.name": "ray-ops"}, {"app.kubernetes.io/name": "kuberay-operator"}),
    ]


def test_serve_config_v2_is_the_serve_config_of_the_pod_spec() -> None:
    """Catches the RayService running a different application config than `mimo serve
    --print-config` would, or a proxy bound to loopback / keys not read from the Secret."""
    spec = apply_overlay(ClusterSpec(), "gpu-prod")
    rayservice = _by_kind(render_manifests(spec), "RayService")[0]
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert config == render_serve_config(pod_spec(spec))
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    app_spec = config["applications"][0]["args"]["spec"]
    assert app_spec["gateway"]["api_keys_file"] == API_KEYS_FILE == "/etc/mimo/api-keys/api-keys"
    assert app_spec["model"]["path"] == IMAGE_MODEL_DIR
    assert app_spec["attention"]["num_gpus"] == 1.0
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == RAY_VERSION
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_direct_streaming_switches_every_pod_to_haproxy_with_the_key_forwarded() -> None:
    """Catches a direct-streaming render whose pods start Ray without HAProxy (the app would have no
    route chooser in front), without the body or Authorization header for the chooser (prefix
    routing blind, or blind to the tenant's salt), or a relay render that switches them on."""
    from cluster.spec import DIRECT_STREAMING_ENV

    def envs(objs: list[dict]) -> list[dict[str, str]]:
        groups = _groups(_by_kind(objs, "RayService")[0])
        return [
            {e["name"]: e.get("value") for e in c["env"]}
            for g in groups.values()
            for c in g["template"]["spec"]["containers"]
        ]

    direct = render_manifests(ClusterSpec.from_dict({"gateway": {"direct_streaming": True}}))
    assert all(env.items() >= DIRECT_STREAMING_ENV.items() for env in envs(direct))
    assert DIRECT_STREAMING_ENV["RAY_SERVE_SESSION_ID_HEADER_KEY"] == "authorization"
    relay = render_manifests(ClusterSpec())
    assert not any(set(env) & set(DIRECT_STREAMING_ENV) for env in envs(relay))


def test_local_expert_transport_renders_no_expert_pods() -> None:
    """Catches idle expert pods (and their budget) when experts run inside attention replicas."""
    objs = render_manifests(ClusterSpec.from_dict({"experts": {"transport": "local"}}))
    assert list(_groups(_by_kind(objs, "RayService")[0])) == ["head", "attention"]
    assert [o["metadata"]["name"] for o in _by_kind(objs, "PodDisruptionBudget")] == ["mimo-attention"]


def test_alerts_follow_the_spec_slo_and_the_metrics_table() -> None:
    """Catches alert rules that ignore the spec's TTFT SLO, measure it at a bucket the histogram
    does not have (the ratio would read 100% bad and page forever), use metric names the
    catalog does not export, or lose one of the alert kinds."""
    spec = ClusterSpec.from_dict({"autoscaling": {"ttft_slo_ms": 4000}, "kubernetes": {"namespace": "llm"}})
    rules = _by_kind(render_manifests(spec), "PrometheusRule")[0]["spec"]["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in rules}
    assert list(by_name) == [
        "MimoTTFTBudgetBurnFast", "MimoTTFTBudgetBurnSlow", "MimoKVCacheSaturated", "MimoExpertImbalance",
        "MimoPodRestarting",
    ]  # fmt: skip
    fast = by_name["MimoTTFTBudgetBurnFast"]
    assert fast["labels"] == {"severity": "critical"}
    # 4 s is between the 2.5 s and 5 s edges: measured at 5 s, written to match "5" or "5.0"
    assert fast["expr"].count('ray_mimo_time_to_first_token_seconds_bucket{le=~"5(\\\\.0)?"}') == 2
    assert fast["expr"].count("ray_mimo_time_to_first_token_seconds_count") == 2
    assert "[1h]" in fast["expr"] and "[5m]" in fast["expr"] and fast["expr"].count("> 5 * 0.1") == 2
    kv = "avg(max by (replica) (ray_mimo_kv_cache_usage_perc)) > 0.9"
    assert by_name["MimoKVCacheSaturated"]["expr"] == kv
    assert by_name["MimoExpertImbalance"]["expr"] == "min(ray_mimo_eplb_balancedness) < 0.5"
    assert 'namespace="llm"' in by_name["MimoPodRestarting"]["expr"]
    default = _by_kind(render_manifests(ClusterSpec()), "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0]
    assert default["expr"].count('_bucket{le=~"2\\\\.5"}') == 2  # the 2 s default SLO: first edge 2.5 s
    with pytest.raises(ValueError, match="ttft_slo_ms"):
        render_manifests(ClusterSpec.from_dict({"autoscaling": {"ttft_slo_ms": 90_000}}))


def test_cli_render_k8s(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches `mimo render k8s` printing something other than the render, writing an incomplete
    tree, or accepting conflicting options."""
    config = tmp_path / "c.yaml"
    config.write_text("kubernetes:\n  namespace: llm\n")
    assert main(["render", "k8s", "--config", str(config), "--overlay", "cpu-dev"]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == render_manifests(apply_overlay(ClusterSpec.load(config), "cpu-dev"))
    assert main(["render", "k8s", "--out", str(tmp_path / "k8s")]) == 0
    capsys.readouterr()
    written = {str(p.relative_to(tmp_path / "k8s")) for p in (tmp_path / "k8s").rglob("*.yaml")}
    assert written == set(render_tree(ClusterSpec()))
    assert main(["render", "k8s", "--overlay", "gpu-prod", "--out", str(tmp_path / "x")]) == 2
    assert "--out writes every overlay" in capsys.readouterr().err


def test_overlay_profiles_are_valid_specs() -> None:
    """Catches an overlay profile naming a spec field that does not exist or an invalid value."""
    prod = apply_overlay(ClusterSpec(), "gpu-prod")
    assert (prod.kubernetes.attention_gpus, prod.kubernetes.expert_gpus) == (1, 1)
    assert prod.kubernetes.gpu_node_selector == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    dev = apply_overlay(ClusterSpec(), "cpu-dev")
    assert (dev.kubernetes.attention_gpus, dev.attention.num_replicas) == (0, 1)
    assert set(OVERLAYS) == {"cpu-dev", "gpu-prod"}
    with pytest.raises(ValueError, match="unknown overlay"):
        apply_overlay(ClusterSpec(), "tpu")


def test_gcs_fault_tolerance_points_the_head_at_redis_with_the_password_secret() -> None:
    """Catches a production overlay whose head restart takes serving down (no GCS fault tolerance),
    or one that carries the Redis password in the manifest instead of a Secret reference."""
    default = _by_kind(render_manifests(ClusterSpec()), "RayService")[0]["spec"]["rayClusterConfig"]
    assert "gcsFaultToleranceOptions" not in default  # no Redis is assumed by default
    spec = ClusterSpec.from_dict(
        {"kubernetes": {"gcs_redis_address": "redis.db:6379", "gcs_redis_secret": "r"}}
    )
    cluster = _by_kind(render_manifests(spec), "RayService")[0]["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.db:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "r", "key": "password"}}},
    }
    assert apply_overlay(ClusterSpec(), "gpu-prod").kubernetes.gcs_redis_address is not None
