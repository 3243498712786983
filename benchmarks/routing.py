"""Prefix-aware routing side by side: our router against round-robin, power-of-two, Ray Serve LLM's
`PrefixCacheAffinityRouter`, sglang-router's `cache_aware`, and an oracle that knows every cache.

One multi-session, multi-turn chat/agent trace (`benchmarks/routing_trace.py`: shared system prompts,
growing histories, `--concurrency` sessions in flight, greedy, EOS ignored) is replayed against 4
attention replicas of the tiny model, every replica a Serve replica with the same engine config.
At the defaults every replica's GA pool could hold the whole run's distinct prompt blocks, so the
prefix-aware routers all reach the ceiling; `--sessions 64 --kv-cache-mib 12` makes the caches
evict, and `--sessions 192 --kv-cache-mib 12` runs long enough (753 requests) that its TTFT p99 is
set by routing rather than by the few cold first turns no router can avoid (the README has what
each measured). The JSON records each replica's pool sizes next to the trace's distinct blocks
(`cache_pressure`).
- ours, round_robin, power_of_two, ray_prefix: the Serve application (`cluster.serving.app`), Gateway ->
  Attention replicas (experts in process), through the gateway's HTTP API; Ray's router is plugged in
  as the Attention deployment's request router (`benchmarks/ray_prefix_router.py`).
- ours_direct, ray_prefix_direct: the same application with direct streaming
  (`gateway.direct_streaming`): HAProxy asks the route chooser, which runs the Attention
  deployment's router (ours, or Ray's as above) by `choose_replica`, and forwards the request to that
  replica's own API; the way Ray Serve LLM's direct streaming runs. HAProxy must be switched on
  before Ray starts, so these rows come from this script run again for them in a child process
  with its own Ray cluster.
- sglang_cache_aware, oracle: routers in front of per-replica URLs. Each replica is its own Serve
  application (`benchmarks/routing_worker.py` `ServeWorker`: the same OpenAI API over one engine,
  route prefix /w0 .. /w3), behind sglang-router (its own venv) or behind the oracle, a client-side
  router that before each request asks every replica's engine how many prompt tokens it would hit
  right now (`POST /probe`, looked up on the engine thread) and sends the request to the most hits,
  ties to the fewest requests in flight, then the lowest replica index.
So every router faces the same engines in the same kind of process; TTFT differences are the
routers' (placement, and their own hops). With `--bare-processes` (default) the two URL routers run
once more over 4 plain worker processes (no Ray, no Serve): reported apart, as what Serve's own
threads and hops cost these engines, not as peers.
Each policy starts on fresh replicas (new Serve applications or new worker processes); each run's
system prompts begin with a run-specific line, so no run can hit another run's blocks. Reported per
policy: the engines' prefix-cache hit rate (sum of usage cached_tokens / prompt tokens), client-side
TTFT p50/p99 (request sent -> first streamed chunk), requests/s and output tokens/s, median of
`--runs`, with ratios to the oracle and to ours, and the CPU each serving role spent per request
(`benchmarks/process_cpu.py`: Serve's proxy, our gateway, the attention replicas, sglang-router,
...; every process of the run shares this host's cores, so a hop's CPU is taken from the engines).
Writes benchmarks/results/routing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

for key, value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind Ray to loopback (see tests/conftest.py)
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}.items():
    os.environ.setdefault(key, value)
# Ray reads its auth mode when it is imported (below, through the cluster's modules), before
# `new_cluster_token` makes the token: token auth on, as `mimo serve` runs it
os.environ["RAY_AUTH_MODE"] = "token"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.process_cpu import cpu_seconds, snapshot  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from benchmarks.routing_trace import (  # noqa: E402
    CPU_PREFIX,
    RequestResult,
    Trace,
    ceiling_hit_rate,
    compare,
    goal_check,
    make_trace,
    median_of_runs,
    messages_for,
    summarize,
)
from cluster.cli.local_server import free_port  # noqa: E402
from cluster.serving.ray_auth import new_cluster_token  # noqa: E402
from cluster.spec import ClusterSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "routing.json"
SGLANG_VENV = ROOT / "benchmarks" / ".cache" / "venv-sglang"
SGLANG_VERSION = "0.3.2"
WORKER = ROOT / "benchmarks" / "routing_worker.py"
MODEL = "mimo-tiny"
# routers inside the Serve app; "ours_direct" is ours with direct streaming (its own Ray cluster)
APP_POLICIES = ("ours", "ours_direct", "round_robin", "power_of_two", "ray_prefix", "ray_prefix_direct")
URL_POLICIES = ("oracle", "sglang_cache_aware")  # routers in front of per-replica URLs
ALL_POLICIES = URL_POLICIES + APP_POLICIES
DIRECT = ("ours_direct", "ray_prefix_direct")  # direct streaming: HAProxy -> the chosen replica's API
OURS = ("ours", "ours_direct")
SPEC_POLICY = {"ours": "prefix", "round_robin": "round_robin", "power_of_two": "power_of_two"}

# One request: chat messages -> (ttft_s, usage dict), sent however the policy routes.
Send = Callable[[list[dict[str, str]]], Awaitable[tuple[float, dict[str, Any]]]]


def make_spec(
    args: argparse.Namespace, policy: str = "prefix", port: int = 8000, direct: bool = False
) -> ClusterSpec:
    return ClusterSpec.from_dict(
        {
            "engine": {"kv_cache_mib": args.kv_cache_mib, "max_model_len": 4096, "threads": 1},
            "attention": {"num_replicas": args.replicas, "max_replicas": args.replicas, "num_cpus": 1},
            "experts": {"transport": "local"},
            "router": {"policy": policy},
            "gateway": {
                "port": port,
                "proxy_location": "HeadOnly",
                "num_replicas": args.gateway_replicas,
                "direct_streaming": direct,
            },
            "autoscaling": {"enabled": False},
        }
    )


# --- the client ------------------------------------------------------------------------------


async def stream_chat(
    client: Any, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, dict[str, Any]]:
    """One streaming chat request; TTFT is measured to the first chunk that carries a choice."""
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    ttft = None
    usage: dict[str, Any] = {}
    async for chunk in stream:
        if ttft is None and chunk.choices:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    if ttft is None or not usage:
        raise RuntimeError(f"stream ended without a token or usage: ttft={ttft}, usage={usage}")
    return ttft, usage


def openai_client(base_url: str) -> Any:
    import openai

    # A retry only follows a connection error (a kept-alive connection the server just closed);
    # the API never answers a retryable status here.
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=2, timeout=300)


async def replay(
    trace: Trace, nonce: int, send: Send, concurrency: int, arrival_interval_s: float
) -> tuple[list[RequestResult], float]:
    """Every session's turns in order (each turn sent when the previous one finished); session k
    starts no earlier than k * `arrival_interval_s`, and at most `concurrency` are in flight."""
    pending = list(enumerate(trace.sessions))
    results: list[RequestResult] = []
    start = time.perf_counter()

    async def worker() -> None:
        while pending:
            k, session = pending.pop(0)
            await asyncio.sleep(max(0.0, start + k * arrival_interval_s - time.perf_counter()))
            for turn_index in range(len(session.turns)):
                sent = time.perf_counter() - start
                ttft, usage = await send(messages_for(trace, session, turn_index, nonce))
                details = usage.get("prompt_tokens_details") or {}
                results.append(
                    RequestResult(
                        session_id=session.session_id,
                        turn_index=turn_index,
                        prompt_tokens=int(usage["prompt_tokens"]),
                        cached_tokens=int(details.get("cached_tokens") or 0),
                        completion_tokens=int(usage["completion_tokens"]),
                        ttft_s=ttft,
                        start_s=sent,
                        end_s=time.perf_counter() - start,
                    )
                )

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def warm_up(sends: list[Send]) -> None:
    """A few short requests with prompts no run shares (first forward passes are slow)."""
    messages = [[{"role": "user", "content": f"Warm up number {i}: say something."}] for i in range(16)]
    await asyncio.gather(*(sends[i % len(sends)](m) for i, m in enumerate(messages)))


def run_policy(
    name: str, send: Send, warm: list[Send], trace: Trace, args: argparse.Namespace, nonces: Iterator[int],
    close: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Warm up through `warm`, then `--runs` replays of the trace through `send`; medians. `close` is
    awaited on the same event loop at the end (clients bound to that loop close on it). `name` labels
    the log lines and the --details files, so it must be unique per row of the report."""

    async def go() -> list[dict[str, float]]:
        try:
            return await replays()
        finally:
            if close is not None:
                await close()

    async def replays() -> list[dict[str, float]]:
        await warm_up(warm)
        summaries = []
        for run in range(args.runs):
            await asyncio.sleep(args.settle_s)  # replicas idle, reports current
            before = snapshot()
            results, wall_s = await replay(
                trace, next(nonces), send, args.concurrency, args.arrival_interval_s
            )
            spent = cpu_seconds(before, snapshot())
            if args.details is not None:  # every request, for looking into one policy's tail
                args.details.mkdir(parents=True, exist_ok=True)
                rows = [dataclasses.asdict(r) for r in sorted(results, key=lambda r: r.start_s)]
                (args.details / f"{name}_run{run}.json").write_text(json.dumps(rows, indent=1))
            summary = summarize(results, wall_s) | {
                f"{CPU_PREFIX}{role}": seconds * 1000 / len(results) for role, seconds in spent.items()
            }
            summaries.append(summary)
            print(
                f"{name} run {run}: " + json.dumps({k: round(v, 4) for k, v in summary.items()}), flush=True
            )
        return summaries

    return median_of_runs(asyncio.run(go()))


# --- Serve policies ----------------------------------------------------------------------------


def ray_router_config() -> Any:
    from ray.serve.config import RequestRouterConfig

    from benchmarks.ray_prefix_router import TokenPromptAffinityRouter

    options: dict[str, Any] = {
        "request_router_class": TokenPromptAffinityRouter
    }  # Ray types every kwarg as a dict
    return RequestRouterConfig(**options)


def run_serve_policies(
    policies: list[str], sglang: Path | None, trace: Trace, args: argparse.Namespace, nonces: Iterator[int]
) -> dict[str, Any]:
    """Every policy over Serve replicas: the application's routers, then the URL routers over one
    Serve application per replica."""
    import ray
    from ray import serve

    from cluster.serving.app import APP_NAME, build_application

    out: dict[str, Any] = {}
    port = free_port()
    # address="local": always a private cluster, never one another program started on this host;
    # token auth on, as `mimo serve` runs it
    token = new_cluster_token()
    ray.init(address="local", num_cpus=args.replicas + 4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        for name in policies:
            started = time.perf_counter()
            if name in URL_POLICIES:
                with serve_workers(make_spec(args), port) as urls:
                    print(f"{name}: deployed in {time.perf_counter() - started:.1f} s", flush=True)
                    out[name] = run_url_policy(name, urls, sglang, trace, args, nonces)
                continue
            spec = make_spec(args, SPEC_POLICY.get(name, "prefix"), port, direct=name in DIRECT)
            router = ray_router_config() if name.startswith("ray_prefix") else None
            serve.run(build_application(spec, request_router=router), name=APP_NAME, route_prefix="/")
            wait_http(f"http://127.0.0.1:{port}/ready", timeout_s=300)
            print(f"{name}: deployed in {time.perf_counter() - started:.1f} s", flush=True)
            send = direct_send(openai_client(f"http://127.0.0.1:{port}/v1"), args.max_tokens)
            out[name] = run_policy(name, send, [send], trace, args, nonces)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
        token.remove()
    return {name: row | {"harness": "serve"} for name, row in out.items()}


@contextmanager
def serve_workers(spec: ClusterSpec, port: int) -> Iterator[list[str]]:
    """One Serve application per replica (`ServeWorker`, route prefix /w<i>), with the Attention
    deployment's resources and runtime env; yields their base URLs and deletes them after."""
    from ray import serve

    from benchmarks.routing_worker import ServeWorker
    from cluster.serving.app import RUNTIME_ENV

    a = spec.attention
    deployment = serve.deployment(
        name="Worker",
        num_replicas=1,
        max_ongoing_requests=a.max_ongoing_requests,
        ray_actor_options={"num_cpus": a.num_cpus, "runtime_env": RUNTIME_ENV},
    )(serve.ingress()(ServeWorker))
    names = [f"w{i}" for i in range(a.num_replicas)]
    try:
        for name in names:
            serve.run(deployment.bind(spec.model_dump(mode="json")), name=name, route_prefix=f"/{name}")
        yield wait_healthy([f"http://127.0.0.1:{port}/{name}" for name in names])
    finally:
        for name in names:
            serve.delete(name)


def run_direct_child(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The direct-streaming rows, from this script run for them alone with DIRECT_STREAMING_ENV set."""
    import tempfile

    from cluster.spec import DIRECT_STREAMING_ENV

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "direct.json"
        argv = [
            sys.executable, __file__, "--policies", *names, "--no-bare-processes", "--out", str(out),
            "--runs", str(args.runs), "--seed", str(args.seed), "--sessions", str(args.sessions),
            "--concurrency", str(args.concurrency), "--arrival-interval-s", str(args.arrival_interval_s),
            "--max-tokens", str(args.max_tokens), "--replicas", str(args.replicas),
            "--kv-cache-mib", str(args.kv_cache_mib), "--settle-s", str(args.settle_s),
            *(["--details", str(args.details)] if args.details is not None else []),
        ]  # fmt: skip
        subprocess.run(argv, check=True, env=os.environ | DIRECT_STREAMING_ENV)
        rows: dict[str, Any] = json.loads(out.read_text())["policies"]
        return rows


def wait_healthy(urls: list[str]) -> list[str]:
    """Waits until every replica URL answers /health; returns the URLs."""
    for url in urls:
        wait_http(url + "/health", timeout_s=300)
    return urls


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not answering 200 after {timeout_s} s")
        time.sleep(0.5)


# --- bare worker processes -------------------------------------------------------------------


@contextmanager
def workers(args: argparse.Namespace) -> Iterator[list[str]]:
    """`--replicas` worker processes; yields their base URLs (http://127.0.0.1:PORT)."""
    spec_json = make_spec(args).model_dump_json()
    ports = [free_port() for _ in range(args.replicas)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--port", str(port), "--spec", spec_json],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        yield wait_healthy([f"http://127.0.0.1:{port}" for port in ports])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


class Oracle:
    """Routes each request to the worker whose engine would hit the most prompt tokens right now."""

    def __init__(self, urls: list[str], max_tokens: int) -> None:
        import httpx2

        from mimo.tokenizer import Tokenizer

        self.urls = urls
        self.clients = [openai_client(url + "/v1") for url in urls]
        self.http = httpx2.AsyncClient(timeout=60)
        self.tokenizer = Tokenizer.from_dir(ROOT / "checkpoints" / "mimo-tiny")
        self.in_flight = [0] * len(urls)
        self.max_tokens = max_tokens
        self.num_sent = [0] * len(urls)

    async def probe(self, url: str, token_ids: list[int]) -> int:
        import httpx2

        for attempt in range(3):  # a read-only question: safe to ask again after a dropped connection
            try:
                reply = await self.http.post(url + "/probe", json={"prompt_token_ids": token_ids})
                return int(reply.raise_for_status().json()["cached_tokens"])
            except httpx2.TransportError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def send(self, messages: list[dict[str, str]]) -> tuple[float, dict[str, Any]]:
        token_ids = render_prompt(self.tokenizer, messages)
        hits = await asyncio.gather(*(self.probe(url, token_ids) for url in self.urls))
        best = min(range(len(self.urls)), key=lambda i: (-hits[i], self.in_flight[i], i))
        self.in_flight[best] += 1
        self.num_sent[best] += 1
        try:
            return await stream_chat(self.clients[best], messages, self.max_tokens)
        finally:
            self.in_flight[best] -= 1


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Exactly what the gateway renders (same code path, same tokenizer)."""
    from gateway.chat import render_chat
    from gateway.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({"model": MODEL, "messages": messages})
    return render_chat(body, tokenizer).prompt_token_ids


def trace_prompts(trace: Trace, nonce: int) -> list[list[int]]:
    from mimo.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(ROOT / "checkpoints" / "mimo-tiny")
    return [
        render_prompt(tokenizer, messages_for(trace, session, k, nonce))
        for session in trace.sessions
        for k in range(len(session.turns))
    ]


def cache_pressure(spec: ClusterSpec, prompts: list[list[int]]) -> dict[str, int]:
    """Each replica's pool sizes in blocks beside the trace's distinct prompt blocks (one run)."""
    from cluster.serving.attention_deployment import engine_config
    from mimo.config import MiMoConfig
    from protocol.block_hash import block_hashes
    from replicas.engine.engine_config import build_layout
    from replicas.engine.kv_layout import swa_blocks_per_seq

    layout = build_layout(MiMoConfig.from_file(f"{spec.model.path}/config.json"), engine_config(spec))
    distinct = {h for p in prompts for h in block_hashes(p, layout.block_size)}
    return {
        "ga_blocks_per_replica": layout.num_full_blocks,
        "swa_blocks_per_replica": layout.num_swa_blocks,
        "swa_blocks_per_cached_window": swa_blocks_per_seq(layout.window, layout.block_size, 1),
        "trace_distinct_prompt_blocks": len(distinct),
    }


def sglang_python(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """sglang-router's interpreter, or None with the reason it is skipped."""
    python = args.sglang_python
    if not python.exists() and args.make_sglang_venv:
        venv = python.parents[1]
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"sglang-router=={SGLANG_VERSION}"],
            capture_output=True,
            text=True,
        )
        if installed.returncode != 0:
            return None, f"pip install sglang-router failed: {installed.stderr[-500:]}"
    if not python.exists():
        return None, f"no sglang-router venv at {python} (run with --make-sglang-venv)"
    return python, None


@contextmanager
def sglang_router(python: Path, urls: list[str]) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *urls, "--policy", "cache_aware",
            "--tokenizer-path", str(ROOT / "checkpoints" / "mimo-tiny"), "--log-level", "warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def direct_send(client: Any, max_tokens: int) -> Send:
    async def send(messages: list[dict[str, str]]) -> tuple[float, dict[str, Any]]:
        return await stream_chat(client, messages, max_tokens)

    return send


def run_url_policy(
    name: str, urls: list[str], sglang: Path | None, trace: Trace, args: argparse.Namespace,
    nonces: Iterator[int], label: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The oracle or sglang-router in front of these replica URLs (fresh engines, every one warmed);
    `label` (default: the policy's name) names the run in logs and --details."""
    label = label or name
    warm = [direct_send(openai_client(url + "/v1"), args.max_tokens) for url in urls]
    if name == "oracle":
        oracle = Oracle(urls, args.max_tokens)
        return run_policy(label, oracle.send, warm, trace, args, nonces, oracle.http.aclose) | {
            "requests_per_replica": oracle.num_sent
        }
    assert name == "sglang_cache_aware" and sglang is not None
    with sglang_router(sglang, urls) as router_url:
        via_router = direct_send(openai_client(router_url + "/v1"), args.max_tokens)
        return run_policy(label, via_router, warm, trace, args, nonces)


def run_process_policies(
    policies: list[str], sglang: Path | None, trace: Trace, args: argparse.Namespace, nonces: Iterator[int]
) -> dict[str, Any]:
    """The URL routers over bare worker processes (no Ray, no Serve)."""
    out: dict[str, Any] = {}
    for name in policies:
        with workers(args) as urls:  # fresh engines: cold caches for this policy
            out[name] = run_url_policy(
                name, urls, sglang, trace, args, nonces, label=f"bare_processes_{name}"
            ) | {"harness": "worker_processes"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sessions", type=int, default=28)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--arrival-interval-s", type=float, default=0.5, help="between session starts")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument(
        "--gateway-replicas",
        type=int,
        default=1,
        help="Gateway replicas of our Serve application (a URL-routed replica serves its own API)",
    )
    parser.add_argument("--kv-cache-mib", type=int, default=24, help="per replica (see above)")
    parser.add_argument("--settle-s", type=float, default=2.0, help="idle time before each run")
    parser.add_argument("--policies", nargs="+", default=list(ALL_POLICIES), choices=ALL_POLICIES)
    parser.add_argument("--sglang-python", type=Path, default=SGLANG_VENV / "bin" / "python")
    parser.add_argument("--make-sglang-venv", action="store_true", help="create the sglang venv if missing")
    parser.add_argument(
        "--bare-processes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the URL routers over bare worker processes (reported apart)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--details", type=Path, default=None, help="write every request of every run here")
    args = parser.parse_args()
    for name in ("httpx", "httpx2", "openai", "ray.serve"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)

    trace = make_trace(args.seed, num_sessions=args.sessions)
    prompts = trace_prompts(trace, nonce=0)
    ceiling = ceiling_hit_rate(prompts, make_spec(args).engine.block_size)
    nonces = iter(range(1000, 10000))  # every run of every policy: its own first line
    started = time.perf_counter()
    skipped: dict[str, str] = {}
    sglang, reason = sglang_python(args) if "sglang_cache_aware" in args.policies else (None, None)
    if reason is not None:
        skipped["sglang_cache_aware"] = reason
        print(f"sglang_cache_aware skipped: {reason}", flush=True)
    runnable = [p for p in args.policies if p not in skipped]
    # direct streaming needs HAProxy in the whole Ray cluster, switched on before Ray is imported:
    # this script runs it again for that policy alone, in a child process with the switches set
    in_child = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    direct = [] if in_child else [p for p in runnable if p in DIRECT]
    policies = run_serve_policies([p for p in runnable if p not in direct], sglang, trace, args, nonces)
    if direct:
        policies |= run_direct_child(args, direct)
    url_runnable = [p for p in runnable if p in URL_POLICIES]
    bare = run_process_policies(url_runnable, sglang, trace, args, nonces) if args.bare_processes else {}
    spec = make_spec(args)
    result = {
        "source": provenance(),
        "setup": {
            "trace": {
                "seed": args.seed, "sessions": args.sessions, "requests": trace.num_requests,
                "system_prompts": len(trace.system_prompts), "turns": "3-5", "concurrency": args.concurrency,
                "arrival_interval_s": args.arrival_interval_s,
                "max_tokens": args.max_tokens, "greedy": True, "ignore_eos": True,
            },
            "replicas": args.replicas, "gateway_replicas": args.gateway_replicas, "engine": spec.engine.model_dump(), "experts": "in process",
            "runs": args.runs, "statistic": "median over runs",
            "hit_rate": "sum(usage.prompt_tokens_details.cached_tokens) / sum(usage.prompt_tokens)",
            "ttft": "client-side, request sent -> first streamed chunk with a choice",
            "cpu_ms_per_request": "CPU seconds (user + system) each role's processes spent during a "
            "run, over its requests, from /proc; median over runs",
            "oracle": "before each request every replica's engine is asked (POST /probe, KV cache "
            "manager lookup on the engine thread) how many prompt tokens it would hit; the request "
            "goes to the most hits, ties to the fewest in flight, then the lowest index",
            "url_routers": "oracle and sglang-router in front of one Serve application per replica "
            "(route prefix /w<i>, the gateway's API over one engine in the replica)",
            "bare_processes": "the URL routers again over plain worker processes (no Ray, no Serve): "
            "what Serve costs these engines; not peers of the rows in policies",
            "sglang_router": SGLANG_VERSION, "elapsed_s": round(time.perf_counter() - started, 1),
        },
        "ceiling_hit_rate": round(ceiling, 4),  # one never-evicting cache: no router can beat it
        "cache_pressure": cache_pressure(spec, prompts),
        "skipped": skipped,
        "policies": policies,
        "bare_processes": bare,
        "ratios": compare(policies, "oracle", "ours"),
        "goals": {  # per configuration of ours; the other one is not a peer
            name: goal_check(policies, "oracle", name, ceiling, own=[n for n in OURS if n != name])
            for name in OURS
            if name in policies
        },
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"], "goals": result["goals"]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
