"""Prefix caching on the tiny model: a 2K-token shared prefix, cold request vs repeated request.

Each run starts a fresh engine, sends a 2,048-token prompt plus a short suffix (cold), then the same
prefix with another suffix (warm); it records time to first token and the cached tokens reported
in usage. Median of --runs. Writes benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mimo.tokenizer import Tokenizer  # noqa: E402
from mimo.weights import load_model  # noqa: E402
from protocol.messages import GenerateRequest  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402
from replicas.engine.engine import Engine  # noqa: E402
from replicas.engine.engine_config import EngineConfig  # noqa: E402

TINY = ROOT / "checkpoints" / "mimo-tiny"


def ttft(engine: Engine, request: GenerateRequest) -> tuple[float, int]:
    """Seconds to the first generated token, and the request's cached prompt tokens."""
    start = time.perf_counter()
    engine.add(request)
    first = None
    cached = 0
    while engine.has_work():
        for chunk in engine.step():
            if first is None and chunk.token_ids:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                cached = chunk.usage.cached_tokens
    assert first is not None
    return first, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(TINY)
    tokenizer = Tokenizer.from_dir(TINY)
    gen = torch.Generator().manual_seed(7)
    prefix = torch.randint(10, 4000, (args.prefix_len,), generator=gen).tolist()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    cold, warm, cached = [], [], []
    for run in range(args.runs):
        engine = Engine(model, tokenizer, EngineConfig(max_prefill_chunk=512, max_model_len=4096))
        t_cold, _ = ttft(engine, GenerateRequest(f"cold{run}", [*prefix, 11, 12, 13], params))
        t_warm, hit = ttft(engine, GenerateRequest(f"warm{run}", [*prefix, 21, 22, 23, 24, 25], params))
        cold.append(t_cold)
        warm.append(t_warm)
        cached.append(hit)
    result = {
        "prefix_tokens": args.prefix_len,
        "cached_tokens_reported": cached,
        "ttft_cold_s_median": statistics.median(cold),
        "ttft_warm_s_median": statistics.median(warm),
        "ttft_speedup": statistics.median(cold) / statistics.median(warm),
        "runs": args.runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
