"""A real Prometheus (Debian's package, started here on 127.0.0.1) scrapes the running cluster
through Ray's one metrics port per node; a load step makes the application autoscaling policy
(reading that Prometheus) scale attention replicas 1 -> 2 and back without flapping; every PromQL
query of the Grafana dashboards then returns data; EPLB moves experts live under the load."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import openai
import pytest
import ray
from ray import serve

from cluster.cli.local_server import free_port
from cluster.serving.deploy import deploy
from cluster.serving.gateway_deployment import APP_NAME
from cluster.spec import ClusterSpec
from observability.dashboards import dashboard_exprs

pytestmark = pytest.mark.integration
MODEL = "mimo-tiny"
LOAD_KEYS = [f"sk-load-{i}" for i in range(10)]
SYSTEM = "You are a storyteller for children. Keep every story gentle and short. " * 3


def _query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10
    ) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.fixture(scope="module")
def prometheus(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: run bash scripts/setup (Debian package prometheus)"
    targets = [f"127.0.0.1:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
    assert len(targets) == 2  # one scrape target per node, whatever runs on it
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
    }
    (work / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "log", "w"),  # noqa: SIM115
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, (work / "log").read_text()[-2000:]
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster_url(prometheus: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("\n".join([*LOAD_KEYS, "sk-burst"]) + "\n")
    port = free_port()
    spec = ClusterSpec.from_dict(
        {
            # a small KV budget so the load step queues and preempts (its queries need events)
            "engine": {
                "kv_cache_mib": 6,
                "max_model_len": 512,
                "max_num_seqs": 8,
                "max_num_batched_tokens": 256,
                "max_prefill_chunk": 256,
                "num_mtp_drafts": 2,
            },
            "attention": {"num_replicas": 1, "min_replicas": 1, "max_replicas": 2, "num_cpus": 0.5},
            "experts": {"num_shards": 2, "num_cpus": 0.5, "num_redundant": 4, "eplb_interval_s": 4},
            "gateway": {
                "port": port,
                "proxy_location": "HeadOnly",
                "api_keys_file": str(keys),
                "requests_per_minute": 20,
            },
            "autoscaling": {
                "upscale_delay_s": 2,
                "downscale_delay_s": 10,
                "cooldown_s": 5,
                "target_waiting_per_replica": 1,
            },
            "observability": {"prometheus_url": prometheus},
        }
    )
    deploy(spec)
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


def _decisions(prometheus: str) -> dict[str, float]:
    rows = _query(prometheus, 'sum by (direction) (ray_mimo_autoscaling_decisions_total{pool="attention"})')
    return {r["metric"]["direction"]: float(r["value"][1]) for r in rows}


def _num_attention_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments["Attention"]
    return int(status.replica_states.get("RUNNING", 0))


def _load(url: str, key: str, stop: threading.Event, outcomes: list[str]) -> None:
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
    i = 0
    while not stop.is_set():
        i += 1
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell story {key} {i} about the sea."}],
            max_tokens=200,
            temperature=0.8,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        outcomes.append(finish[-1] if finish else "cut")


def test_load_step_scales_attention_up_and_back_and_dashboards_have_data(
    cluster_url: str, prometheus: str
) -> None:
    """Catches a policy that ignores load, flaps, never scales back, or metrics/dashboards that
    Prometheus cannot see (wrong names, missing series, a port per process)."""
    assert _num_attention_replicas() == 1
    before = _decisions(prometheus)  # other applications on this session's nodes may have decided too
    stop, outcomes = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(cluster_url, k, stop, outcomes)) for k in LOAD_KEYS]
    for t in threads:
        t.start()
    samples = [(time.monotonic(), 1)]
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and samples[-1][1] < 2:
        time.sleep(0.5)
        samples.append((time.monotonic(), _num_attention_replicas()))
    time.sleep(8)  # keep loading the two replicas a little (EPLB and both replicas' metrics)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    assert samples[-1][1] == 2, f"never scaled up: {samples[-5:]}"
    deadline = time.monotonic() + 180
    # every count read is a sample (CI once saw the loop end on a read it did not record)
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), _num_attention_replicas()))
        if samples[-1][1] == 1:
            break
        time.sleep(1.0)
    assert samples[-1][1] == 1, "never scaled back down"
    counts = [n for _, n in samples]
    changes = [b for a, b in itertools.pairwise(counts) if a != b]
    assert changes == [2, 1], f"flapped: {changes}"
    assert outcomes and all(o == "length" for o in outcomes), outcomes  # no request lost or cut

    decisions = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _decisions(prometheus)
        decisions = {k: now.get(k, 0.0) - before.get(k, 0.0) for k in ("up", "down")}
        if decisions["down"]:
            break
        time.sleep(2)
    assert decisions == {"up": 1.0, "down": 1.0}, decisions

    client = openai.OpenAI(base_url=cluster_url, api_key="sk-burst", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "A story, please."}]
    cached = []
    with pytest.raises(openai.RateLimitError):  # 20 requests per minute per key
        for _ in range(25):
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
    assert cached[0] == 0 and min(cached[1:]) > 0, cached  # the idle cluster reuses the prefix

    deadline = time.monotonic() + 60  # Ray's agents export every few seconds, then a scrape
    while True:
        empty = [
            (board, title, expr) for board, title, expr in dashboard_exprs() if not _query(prometheus, expr)
        ]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, f"dashboard queries without data: {empty}"
