"""Routing replay: the router's own code in a deterministic simulation, at 1, 2 and 4 routers.

Drives `router.router_core.RouterCore` (what each gateway's Serve router runs) over simulated
attention replicas (`benchmarks/replay_replica.py`: the engine's step loop with the calibrated step
time and prefill rate, an LRU prefix cache, real `ReplicaReportBuilder` reports) on the routing
benchmark's traces (`benchmarks/replay_workload.py`), for every combination of trace, cache size,
number of routers (each request reaches one at random), report delay and policy, each over
`--seeds` workload seeds. Reported per run: hit rate against the one-big-cache bound, load max/mean
(sampled every 0.1 s), queueing (arrival at the replica -> admitted) and TTFT p50/p99, the share of
picks that went to a replica busier than the least loaded, and each router's load-estimate error
(estimate - truth, every replica at every decision). Writes benchmarks/results/routing_replay.json
with the commit, the parameters and the seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from benchmarks.replay_replica import ReplicaParams  # noqa: E402
from benchmarks.replay_sim import Outcome, SimConfig, Simulation, ceiling_hit_rate  # noqa: E402
from benchmarks.replay_workload import TRACES, make_workload, trace_sessions  # noqa: E402
from benchmarks.routing_trace import percentile  # noqa: E402
from router.policy import RouterConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "routing_replay.json"
BLOCK_SIZE = 16
# policy name -> RouterConfig fields (every other field at its default)
BEFORE = {"cost": "blocks", "share_loads": False, "tie_break": "first_block", "eviction_aware": False}
POLICIES: dict[str, dict[str, Any]] = {
    "prefix": {},  # the defaults: time cost, shared loads, distinct tie key
    "prefix_before": BEFORE,  # the policy before issue 28 (block score, no shared loads, first block)
    "power_of_two": {"policy": "power_of_two"},
    "round_robin": {"policy": "round_robin"},
    # ablations: one change at a time
    "prefix_eviction_aware": {"eviction_aware": True},
    "prefix_before_shared_loads": BEFORE | {"share_loads": True},
    "prefix_blocks": {"cost": "blocks"},
}
MAIN_POLICIES = ["prefix", "prefix_before", "power_of_two", "round_robin"]


def summarize(outcome: Outcome) -> dict[str, Any]:
    hit_rate = sum(outcome.cached_tokens) / sum(outcome.prompt_tokens)
    bound = ceiling_hit_rate(outcome.arrival_hashes, outcome.num_tokens_in_order, BLOCK_SIZE)
    errors = [e for per_router in outcome.estimate_errors for e in per_router]
    return {
        "num_requests": len(outcome.queue_s),
        "hit_rate": round(hit_rate, 4),
        "bound": round(bound, 4),
        "hit_over_bound": round(hit_rate / bound, 4),
        "load_max_over_mean": round(statistics.fmean(outcome.load_ratios), 3) if outcome.load_ratios else 1.0,
        "queue_p50_s": round(percentile(outcome.queue_s, 50), 4),
        "queue_p99_s": round(percentile(outcome.queue_s, 99), 4),
        "ttft_p50_s": round(percentile(outcome.ttft_s, 50), 4),
        "ttft_p99_s": round(percentile(outcome.ttft_s, 99), 4),
        "picked_not_least_loaded": round(outcome.picked_not_least / len(outcome.queue_s), 3),
        "estimate_error_mean_abs": round(statistics.fmean(abs(e) for e in errors), 3),
        "estimate_error_p99_abs": round(percentile([abs(e) for e in errors], 99), 2),
        "estimate_error_mean_abs_per_router": [
            round(statistics.fmean(abs(e) for e in per_router), 3) if per_router else None
            for per_router in outcome.estimate_errors
        ],
    }


_SESSIONS: dict[tuple[str, int], Any] = {}


def run_one(cell: dict[str, Any]) -> dict[str, Any]:
    """One simulation (runs in a worker process; tokenized traces are cached per process)."""
    key = (cell["trace"], cell["trace_seed"])
    if key not in _SESSIONS:
        _SESSIONS[key] = trace_sessions(*key)
    workload = make_workload(_SESSIONS[key], TRACES[cell["trace"]], BLOCK_SIZE, cell["seed"])
    config = SimConfig(
        router=RouterConfig(block_size=BLOCK_SIZE, **POLICIES[cell["policy"]]),
        replica=ReplicaParams(num_blocks=cell["cache_blocks"], block_size=BLOCK_SIZE),
        num_replicas=cell["num_replicas"],
        num_routers=cell["num_routers"],
        report_delay_s=cell["report_delay_s"],
        seed=cell["seed"],
    )
    start = time.perf_counter()
    metrics = summarize(Simulation(workload, config).run())
    return cell | {"metrics": metrics, "wall_s": round(time.perf_counter() - start, 1)}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over seeds per cell, with every seed's value beside it."""
    keys = ("trace", "cache_blocks", "num_routers", "report_delay_s", "policy")
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in keys), []).append(run)
    rows = []
    order = list(POLICIES)

    def sort_key(item: tuple[tuple[Any, ...], Any]) -> tuple[Any, ...]:
        trace, blocks, routers, delay, policy = item[0]
        return trace, -blocks, delay, routers, order.index(policy)

    for group_key, group in sorted(groups.items(), key=sort_key):
        metrics = [g["metrics"] for g in group]
        row: dict[str, Any] = dict(zip(keys, group_key, strict=True))
        for name, value in metrics[0].items():
            if isinstance(value, (int, float)):
                values = [m[name] for m in metrics]
                row[name] = round(statistics.median(values), 4)
                row[f"{name}_runs"] = values
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], delays: list[float]) -> str:
    """The summary as markdown tables, one per trace and cache size: every seed's value beside the
    median for hit rate over the bound and queueing p99."""

    def runs(row: dict[str, Any], name: str, digits: int) -> str:
        values = "/".join(f"{v:.{digits}f}" for v in row[f"{name}_runs"])
        return f"{row[name]:.{digits}f} ({values})"

    out = []
    groups = sorted({(r["trace"], r["cache_blocks"]) for r in rows}, key=lambda g: (g[0], -g[1]))
    for trace, blocks in groups:
        out.append(f"\n{trace}, {blocks} blocks per replica:\n")
        out.append(
            "| delay s | routers | policy | hit / bound (seeds) | load max/mean | queue p50 s "
            "| queue p99 s (seeds) | TTFT p99 s | not least loaded | estimate error |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if (r["trace"], r["cache_blocks"]) != (trace, blocks) or r["report_delay_s"] not in delays:
                continue
            out.append(
                f"| {r['report_delay_s']} | {r['num_routers']} | {r['policy']} | {runs(r, 'hit_over_bound', 3)} "
                f"| {r['load_max_over_mean']:.2f} | {r['queue_p50_s']:.3f} | {runs(r, 'queue_p99_s', 3)} "
                f"| {r['ttft_p99_s']:.3f} | {r['picked_not_least_loaded']:.2f} | {r['estimate_error_mean_abs']:.2f} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces", nargs="+", default=list(TRACES), choices=list(TRACES))
    parser.add_argument("--cache-blocks", nargs="+", type=int, default=[8000, 1500], help="per replica")
    parser.add_argument("--routers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--delays", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--policies", nargs="+", default=MAIN_POLICIES, choices=list(POLICIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="workload seeds")
    parser.add_argument("--trace-seed", type=int, default=0, help="make_trace's seed (the prompts)")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--label", default="", help="stored with the results (e.g. before/after)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, default=None, help="print a results file as markdown and exit")
    args = parser.parse_args()
    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())["summary"], args.delays))
        return
    cells = [
        {
            "trace": trace,
            "trace_seed": args.trace_seed,
            "cache_blocks": blocks,
            "num_routers": routers,
            "report_delay_s": delay,
            "policy": policy,
            "seed": seed,
            "num_replicas": args.replicas,
        }
        for trace, blocks, routers, delay, policy, seed in itertools.product(
            args.traces, args.cache_blocks, args.routers, args.delays, args.policies, args.seeds
        )
    ]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        runs = []
        for run in pool.map(run_one, cells):
            print(json.dumps({k: v for k, v in run.items() if k != "metrics"} | run["metrics"]), flush=True)
            runs.append(run)
    result = {
        "label": args.label,
        "source": provenance(),
        "parameters": {
            "block_size": BLOCK_SIZE,
            "traces": {name: asdict(TRACES[name]) for name in args.traces},
            "replica": asdict(replace(ReplicaParams(num_blocks=0), num_blocks=-1)),
            "sim": {
                k: v
                for k, v in asdict(SimConfig(RouterConfig(), ReplicaParams(0))).items()
                if k not in ("router", "replica")
            },
            "policies": POLICIES,
            "router_config": RouterConfig(block_size=BLOCK_SIZE).to_kwargs(),
            "seeds": args.seeds,
            "trace_seed": args.trace_seed,
        },
        "wall_s": round(time.perf_counter() - start, 1),
        "summary": aggregate(runs),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
