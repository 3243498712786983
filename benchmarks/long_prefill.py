"""Time to first token of one long cold prompt on the tiny model: how prefill cost grows with context.

One prompt each of 8K / 32K / 60K tokens (random ids, seed 0), one new token, greedy, nothing
cached, through the engine with the served chunking (EngineConfig defaults: 512-token chunks)
unless `--chunk` / `--long-chunk` say otherwise; engine start-up and a warm-up request excluded. The key figure is
the cost per prompt token at 60K over that at 8K (attention is linear per token in the context, so
it grows even when nothing else does). `--ga plain` attends every GA chunk with one softmax over
all its keys (the path before online_attention.py), `--ga online` (default) key block by key block.
Besides wall time it records the main thread's CPU time: with `--threads 1` (all compute on that
thread) it is the figure to compare on a shared machine, where wall time mostly measures the
neighbours. Appends a labelled run to benchmarks/results/long_prefill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import replicas.engine.attention_batch as attention_batch  # noqa: E402
from cluster.spec import EMBEDDED_MODEL  # noqa: E402
from mimo.tokenizer import Tokenizer  # noqa: E402
from mimo.weights import load_model  # noqa: E402
from protocol.messages import GenerateRequest  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402
from replicas.engine.engine import Engine  # noqa: E402
from replicas.engine.engine_config import EngineConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "long_prefill.json"


def ttft_s(
    model: Any, tokenizer: Tokenizer, config: EngineConfig, prompt: list[int]
) -> tuple[float, float, int]:
    """(wall seconds, this thread's CPU seconds, first token) of one cold prompt."""
    engine = Engine(model, tokenizer, config)
    engine.generate([GenerateRequest("warmup", prompt[:8], SamplingParams(max_tokens=2, temperature=0.0))])
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start, start_cpu = time.perf_counter(), time.thread_time()
    chunks = engine.generate([GenerateRequest("r", prompt, params)])["r"]
    return time.perf_counter() - start, time.thread_time() - start_cpu, chunks[0].token_ids[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 61440])
    parser.add_argument("--chunk", type=int, default=EngineConfig.max_prefill_chunk)
    parser.add_argument("--step-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    parser.add_argument("--long-chunk", type=int, default=0, help="EngineConfig.long_prefill_chunk")
    parser.add_argument("--ga", choices=["online", "plain"], default="online")
    parser.add_argument("--label", default=None, help="key of this run in the results file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ga == "plain":
        attention_batch.ONLINE_MIN_QUERIES = 10**9
    model = load_model(EMBEDDED_MODEL)
    tokenizer = Tokenizer.from_dir(EMBEDDED_MODEL)
    config = EngineConfig(
        max_prefill_chunk=args.chunk,
        max_num_batched_tokens=max(args.step_tokens, args.chunk),
        long_prefill_chunk=args.long_chunk,
        max_model_len=model.config.max_position_embeddings,
    )
    rows: dict[str, Any] = {}
    for length in args.lengths:
        prompt = torch.randint(10, 4000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
        seconds, cpu_seconds, first_token = ttft_s(model, tokenizer, config, prompt)
        rows[str(length)] = {
            "ttft_s": round(seconds, 2),
            "us_per_token": round(seconds / length * 1e6, 1),
            "cpu_s": round(cpu_seconds, 2),
            "cpu_us_per_token": round(cpu_seconds / length * 1e6, 1),
            "first_token": first_token,
        }
        print(length, json.dumps(rows[str(length)]), flush=True)
    lengths = [str(n) for n in args.lengths]
    run = {
        "setup": {
            "chunk": args.chunk, "long_chunk": args.long_chunk, "step_tokens": config.max_num_batched_tokens,
            "ga": args.ga,
            "threads": args.threads, "cpus": os.cpu_count(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "lengths": rows,
        "per_token_last_over_first": round(
            rows[lengths[-1]]["us_per_token"] / rows[lengths[0]]["us_per_token"], 2
        ),
        "cpu_per_token_last_over_first": round(
            rows[lengths[-1]]["cpu_us_per_token"] / rows[lengths[0]]["cpu_us_per_token"], 2
        ),
    }  # fmt: skip
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label or f"{args.ga}_chunk{args.chunk}_long{args.long_chunk}"] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in run.items() if k.endswith("over_first")}))


if __name__ == "__main__":
    main()
