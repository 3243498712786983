"""Expert dispatch cost per MoE layer and decode throughput: in-process vs Ray vs collective (gloo)
vs the same-node channel (the served default), with ping-pong micro-batches off and on, and a raw
echo over the channel (shards that copy their input rows back, no experts) as its floor.

A random checkpoint with the tiny model's MoE shape (hidden 256, 16 experts top-4, width 96) is
written once; for 1, 2 and 4 shards each transport runs one MoE layer on 8 decode rows (median µs
over many calls; overhead = that minus the in-process time) and an engine decodes 8 and 32
sequences x 32 tokens through it, ping-pong off and on. Every figure is the median of --repeats
runs. Ray shards live on a local Ray instance started only for their runs (its daemons' CPU would
otherwise slow the other transports on 2 cores), collective shards in spawned processes joined by a
gloo group on 127.0.0.1; the caller and every shard use 1 torch thread (the shards share the
caller's 2 cores: a second caller thread only competes with them, and with OMP_WAIT_POLICY=PASSIVE,
which the serving cluster sets so idle OpenMP threads sleep instead of starving a shard, every
parallel region of a 2-thread caller pays a wake-up: the in-process layer call took 2.1 ms instead
of 0.7). Writes benchmarks/results/expert_dispatch.json with the load average.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"
os.environ["RAY_AUTH_MODE"] = "token"  # as `mimo serve` runs Ray
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once when torch loads OpenMP

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from mimo.config import MiMoConfig  # noqa: E402
from mimo.moe import MoE  # noqa: E402
from mimo.tokenizer import Tokenizer  # noqa: E402
from mimo.weights import load_model  # noqa: E402
from protocol.messages import GenerateRequest  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402
from replicas.engine.engine import Engine  # noqa: E402
from replicas.engine.engine_config import EngineConfig  # noqa: E402
from replicas.experts.channel_server import ChannelServer  # noqa: E402
from replicas.experts.dispatch import ExpertDispatcher, ExpertTransport  # noqa: E402
from replicas.experts.expert_placement import ExpertKey, initial_placement  # noqa: E402
from replicas.experts.expert_shard import ExpertShard  # noqa: E402
from replicas.experts.transport_channel import ShardChannel  # noqa: E402
from replicas.experts.transport_collective import CollectiveTransport, init_group, serve_shard  # noqa: E402
from replicas.experts.transport_local import InProcessTransport  # noqa: E402

CKPT = ROOT / "benchmarks" / ".cache" / "dispatch-ckpt"
TINY = ROOT / "checkpoints" / "mimo-tiny"
MOE_LAYERS = list(range(1, 6))


def make_checkpoint() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tests.factory import random_config_dict, write_random_checkpoint

    if not (CKPT / "config.json").exists():
        cfg = random_config_dict(
            num_layers=6, vocab_size=4096, hidden_size=256, moe_intermediate_size=96, intermediate_size=512,
            num_attention_heads=8, num_key_value_heads=2, swa_num_attention_heads=8, swa_num_key_value_heads=4,
            max_position_embeddings=1024, sliding_window_size=64,
        )  # fmt: skip
        write_random_checkpoint(CKPT, cfg)
    return CKPT


def layer_us(dispatcher: ExpertDispatcher, moe: MoE, rows: int, iters: int) -> float:
    x = torch.randn(rows, moe.gate.weight.shape[1])
    with torch.inference_mode():
        routing = moe.gate(x)
        for _ in range(10):
            dispatcher.run(1, x, routing)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            dispatcher.run(1, x, routing)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def decode_tok_s(dispatcher: ExpertDispatcher | None, num_seqs: int = 8) -> float:
    model = load_model(CKPT, experts="all" if dispatcher is None else "none")
    config = EngineConfig(max_model_len=512, kv_cache_bytes=64 * 2**20)
    engine = Engine(model, Tokenizer.from_dir(TINY), config, dispatcher)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    requests = [GenerateRequest(f"r{i}", list(range(10 + i, 42 + i)), params) for i in range(num_seqs)]
    start = time.perf_counter()
    out = engine.generate(requests)
    return sum(len(c.token_ids) for chunks in out.values() for c in chunks) / (time.perf_counter() - start)


def measure(
    transport: ExpertTransport, placement: Any, moe: MoE, iters: int, repeats: int, decode: bool = True
) -> dict[str, Any]:
    """Median over `repeats` of: µs per 8-row layer call, and decode tok/s per (sequences, ping-pong)."""
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        dispatcher = ExpertDispatcher(transport, placement, 16)
        runs.setdefault("layer_us", []).append(layer_us(dispatcher, moe, 8, iters))
        for num_seqs in (8, 32) if decode else ():
            for ping_pong in (False, True):
                d = ExpertDispatcher(transport, placement, 16, ping_pong=ping_pong)
                key = f"decode_tok_s_{num_seqs}seq_pingpong_{'on' if ping_pong else 'off'}"
                runs.setdefault(key, []).append(decode_tok_s(d, num_seqs))
    out: dict[str, Any] = {key: statistics.median(values) for key, values in runs.items()}
    out["layer_us_runs"] = runs["layer_us"]
    out["ping_pong_default"] = ExpertDispatcher(transport, placement, 16).ping_pong
    return out


def _shard_main(path: str, keys: list[ExpertKey], rank: int, world: int, port: int, hidden: int) -> None:
    torch.set_num_threads(1)
    shard = ExpertShard.load(path, keys)
    init_group(rank, world, "127.0.0.1", port)
    serve_shard(shard, hidden)


def _echo_main(paths: Any, hidden: int, top_k: int) -> None:
    """An echo shard: a channel server whose compute copies x back."""
    torch.set_num_threads(1)
    server = ChannelServer(lambda layer, x, ids, weights: x, hidden, top_k)
    paths.put(server.path)
    time.sleep(3600)  # the parent kills it


class EchoTransport(ExpertTransport):
    """The channel's round trip with nothing computed: one ShardChannel per echo process."""

    is_async = True

    def __init__(self, channels: list[ShardChannel]) -> None:
        self.channels = channels

    def send(self, layer: int, messages: list[Any]) -> object:
        for m in messages:
            self.channels[m.shard].call(layer, m)
        return messages

    def wait(self, handle: object) -> list[torch.Tensor]:
        assert isinstance(handle, list)
        return [self.channels[m.shard].result() for m in handle]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_transport(
    kind: str, num_shards: int, moe: MoE, hidden: int, iters: int, repeats: int
) -> dict[str, Any]:
    placement = initial_placement(MOE_LAYERS, 16, num_shards)
    cleanup = None
    transport: ExpertTransport
    if kind == "in_process":
        transport = InProcessTransport(
            [ExpertShard.load(CKPT, placement.experts_of_shard(s)) for s in range(num_shards)]
        )
    elif kind in ("ray", "channel"):
        from replicas.experts.expert_pool import ExpertPool, ShardResources

        pool = ExpertPool.start(CKPT, placement, ShardResources(num_cpus=0.01), strategy="PACK")
        transport = pool.transport() if kind == "ray" else pool.channel_transport()
        cleanup = pool.shutdown
    elif kind == "echo":
        ctx = mp.get_context("spawn")
        paths = ctx.Queue()
        procs = [ctx.Process(target=_echo_main, args=(paths, hidden, 4)) for _ in range(num_shards)]
        for p in procs:
            p.start()
        transport = EchoTransport([ShardChannel(paths.get(timeout=60), 30.0) for _ in procs])

        def cleanup() -> None:
            for p in procs:
                p.kill()
                p.join()
    else:
        port = _free_port()
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_shard_main, args=(str(CKPT), placement.experts_of_shard(s), s + 1, num_shards + 1, port, hidden))
            for s in range(num_shards)
        ]  # fmt: skip
        for p in procs:
            p.start()
        init_group(0, num_shards + 1, "127.0.0.1", port)
        collective = CollectiveTransport(num_shards, hidden)
        transport = collective

        def cleanup() -> None:
            collective.shutdown()
            for p in procs:
                p.join(timeout=30)

    try:  # an echo computes nothing: only its layer call means something
        return measure(transport, placement, moe, iters, repeats, decode=kind != "echo")
    finally:
        if cleanup is not None:
            cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "expert_dispatch.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    make_checkpoint()
    config = MiMoConfig.from_file(CKPT)
    model = load_model(CKPT)
    moe = model.model.layers[1].mlp
    assert isinstance(moe, MoE)
    results: dict[str, Any] = {
        "provenance": provenance(),
        "rows_per_layer_call": 8,
        "decode": "8 or 32 sequences x 32 new tokens after 32-token prompts, ping-pong off/on",
        "repeats": args.repeats,
        "threads": "caller 1, each shard 1; OMP_WAIT_POLICY=" + os.environ["OMP_WAIT_POLICY"],
        "ray": "started only for the Ray transport's runs: its daemons' CPU is that transport's cost",
        "load_avg_1m_before": os.getloadavg()[0],
        "contention": "2 cores shared with other engineers' jobs; load_avg_* are the 1-minute averages",
    }
    rows: dict[int, dict[str, Any]] = {
        shards: {
            kind: run_transport(kind, shards, moe, config.hidden_size, args.iters, args.repeats)
            for kind in ("in_process", "collective", "echo")
        }
        for shards in args.shards
    }
    import ray

    from cluster.serving.ray_auth import new_cluster_token

    token = new_cluster_token()  # token auth on, as `mimo serve` runs it
    atexit.register(token.remove)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for shards in args.shards:
            for kind in ("ray", "channel"):
                rows[shards][kind] = run_transport(
                    kind, shards, moe, config.hidden_size, args.iters, args.repeats
                )
    finally:
        ray.shutdown()
    for shards, row in rows.items():
        base = row["in_process"]["layer_us"]
        for kind in ("ray", "collective", "channel"):
            row[kind]["overhead_us"] = row[kind]["layer_us"] - base
        row["ray_over_collective_layer"] = row["ray"]["layer_us"] / row["collective"]["layer_us"]
        row["ray_over_channel_layer"] = row["ray"]["layer_us"] / row["channel"]["layer_us"]
        row["channel_overhead_over_echo"] = row["channel"]["overhead_us"] / row["echo"]["layer_us"]
        results[f"{shards}_shards"] = row
        print(shards, json.dumps(row), flush=True)
    results["in_model_decode_tok_s"] = decode_tok_s(None)
    results["load_avg_1m_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
