"""Soak: concurrent streaming clients with random cancellations against a running cluster.

Every request must end one way or another: read to its finish reason, cancelled by the client on
purpose, or refused retriably (a 429/503 with Retry-After, or an error event that says to retry:
what a fault in flight may cause); anything else (another error, a stream cut without a finish
reason) is a lost request. `python -m benchmarks.soak` starts a local cluster (the default spec
with a smaller KV cache and two attention replicas), soaks it for --duration-s, with `--fault-every-s` SIGKILLs an expert
shard and an attention replica in turn, samples replica RSS and KV usage every 30 s, checks KV
usage returns to zero and attention-replica memory stays flat, and writes
`benchmarks/results/soak.json` with the commit and spec. tests/integration/test_soak.py runs the
same code for 20 s.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import signal
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openai

from benchmarks.provenance import provenance

WORDS = ["river", "stone", "cloud", "lantern", "garden", "window", "engine", "paper", "violin", "harbor"]


@dataclass
class SoakResult:
    duration_s: float
    num_clients: int
    completed: int = 0
    cancelled: int = 0
    retriable: int = 0  # refused or ended with a retriable error (a fault in flight)
    lost: list[str] = field(default_factory=list)  # what happened to each lost request
    output_tokens: int = 0


def _client_loop(
    url: str, seed: int, deadline: float, cancel_prob: float, result: SoakResult, lock: threading.Lock
) -> None:
    rng = random.Random(seed)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    while time.monotonic() < deadline:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
        cancel_after = rng.randint(1, 8) if rng.random() < cancel_prob else None
        outcome, tokens = "cut", 0
        try:
            stream = client.chat.completions.create(
                model="mimo-tiny",
                messages=[{"role": "user", "content": f"Write about {words}."}],
                max_tokens=rng.randint(4, 96),
                temperature=rng.choice([0.0, 0.7]),
                stream=True,
                stream_options={"include_usage": True},
            )
            for n, chunk in enumerate(stream):
                if cancel_after is not None and n >= cancel_after:
                    stream.close()
                    outcome = "cancelled"
                    break
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].finish_reason in ("stop", "length"):
                    outcome = "completed"
        except openai.APIStatusError as e:
            retriable = e.status_code in (429, 503) and "retry-after" in e.response.headers
            outcome = "retriable" if retriable else f"error: {type(e).__name__}: {str(e)[:120]}"
        except openai.APIError as e:  # an error event inside the stream
            outcome = (
                "retriable" if "retry the request" in str(e) else f"error: {type(e).__name__}: {str(e)[:120]}"
            )
        with lock:
            if outcome == "completed":
                result.completed += 1
                result.output_tokens += tokens
            elif outcome == "cancelled":
                result.cancelled += 1
            elif outcome == "retriable":
                result.retriable += 1
            else:
                result.lost.append(outcome)


def soak(
    url: str, duration_s: float, num_clients: int = 8, cancel_prob: float = 0.3, seed: int = 0
) -> SoakResult:
    result, lock = SoakResult(duration_s, num_clients), threading.Lock()
    deadline = time.monotonic() + duration_s
    threads = [
        threading.Thread(target=_client_loop, args=(url, seed + i, deadline, cancel_prob, result, lock))
        for i in range(num_clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def node_metrics(ports: list[int]) -> dict[str, list[float]]:
    """The mimo series of every node's Ray metrics port: name -> values (all label sets)."""
    out: dict[str, list[float]] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("ray_mimo_"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                out.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
    return out


def settled_metrics(ports: list[int], timeout_s: float = 60.0) -> dict[str, list[float]]:
    """Node metrics once running requests and KV usage read zero, or after `timeout_s` (Ray's agent
    exports every few seconds, so the first reads after a load can still show it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = node_metrics(ports)
        busy = metrics.get("ray_mimo_num_requests_running", [1.0]) + metrics.get(
            "ray_mimo_kv_cache_usage_perc", [1.0]
        )
        if max(busy) == 0.0 or time.monotonic() > deadline:
            return metrics
        time.sleep(1)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def attention_pids() -> list[int]:
    import ray

    pids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "Attention" in actor["name"] and "SERVE_REPLICA" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pids.append(int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))))
    return sorted(pids)


def expert_shard_pids() -> list[int]:
    from ray import serve

    update = serve.get_deployment_handle("ExpertPool", "mimo").current.remote().result(timeout_s=60)
    import ray

    return [int(ray.get(a.pid.remote(), timeout=60)) for a in update.actors]


def inject_faults(every_s: float, keep: int, done: threading.Event, log: list[dict[str, object]]) -> None:
    """Every `every_s`: SIGKILL an expert shard, then an attention replica (never `keep`, the one
    whose memory the soak follows), in turn."""
    kinds = ["expert_shard", "attention_replica"]
    n = 0
    while not done.wait(every_s):
        kind = kinds[n % 2]
        n += 1
        try:
            pids = expert_shard_pids() if kind == "expert_shard" else attention_pids()
            victims = [p for p in pids if p != keep]
            pid = victims[n % len(victims)]
            os.kill(pid, signal.SIGKILL)
            log.append({"at_s": round(time.monotonic() - START, 1), "fault": f"SIGKILL {kind}", "pid": pid})
        except Exception as e:  # noted, the soak goes on
            log.append({"at_s": round(time.monotonic() - START, 1), "fault": kind, "failed": repr(e)[:200]})


START = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--fault-every-s", type=float, default=0.0, help="0: no faults")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from cluster.serving.ray_auth import new_cluster_token

    atexit.register(new_cluster_token().remove)  # token auth on, as `mimo serve` runs it
    import ray
    from ray import serve

    from cluster.cli.local_server import free_port
    from cluster.serving.deploy import deploy
    from cluster.spec import ClusterSpec

    port = free_port()
    spec = ClusterSpec.from_dict(
        {
            "gateway": {"port": port},
            "autoscaling": {"enabled": False},
            "engine": {"max_model_len": 1024, "kv_cache_mib": 64},
            # two replicas whatever the default: faults kill one, the soak follows the other's memory
            "attention": {"num_replicas": 2, "min_replicas": 2},
        }
    )
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=free_port(),
    )
    try:
        deploy(spec)
        url = f"http://127.0.0.1:{port}/v1"
        ports = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
        pids = attention_pids()
        soak(url, 30, args.clients)  # warm-up: allocator and caches reach their working size
        rss_start = {p: rss_bytes(p) for p in pids}
        series: list[list[float]] = []  # RSS MiB per replica, every 30 s: flat, or still climbing?
        kv_series: list[list[float]] = []  # KV usage of every replica and pool, every 30 s
        faults: list[dict[str, object]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(30):
                alive = [p for p in pids if Path(f"/proc/{p}").exists()]  # a killed replica drops out
                series.append([round(rss_bytes(p) / 2**20, 1) for p in alive])
                kv_series.append(node_metrics(ports).get("ray_mimo_kv_cache_usage_perc", []))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if args.fault_every_s > 0:
            threading.Thread(
                target=inject_faults, args=(args.fault_every_s, pids[-1], done, faults), daemon=True
            ).start()
        result = soak(url, args.duration_s, args.clients, seed=1000)
        done.set()
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        rss_end = {p: rss_bytes(p) for p in alive}
        metrics = settled_metrics(ports)
        record = {
            "source": provenance(),
            "spec": spec.model_dump(mode="json", exclude_defaults=True),
            "faults": faults,
            "kv_usage_every_30s": kv_series,
            **asdict(result),
            "kv_usage_after": metrics.get("ray_mimo_kv_cache_usage_perc", []),
            "running_after": metrics.get("ray_mimo_num_requests_running", []),
            "rss_start_mib": {str(p): round(v / 2**20, 1) for p, v in rss_start.items()},
            "rss_end_mib": {str(p): round(v / 2**20, 1) for p, v in rss_end.items()},
            "rss_every_30s_mib": series,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
