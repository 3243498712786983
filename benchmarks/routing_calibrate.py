"""Calibrates the router's time-unit cost on this machine: the tiny model's engine step time and
prefill rate, as `RouterConfig.default_step_s` and `default_prefill_tokens_per_s` take them.

One engine (mimo-tiny, `--threads` torch threads, as one attention replica runs it), timed step by
step: decode-only steps at batch sizes 1..16 (a line through them gives the fixed cost of a step and
the cost per decoding sequence), and prefill-only steps of one 512-token chunk (tokens per second).
Median of `--runs` steps each. Writes benchmarks/results/routing_calibration.json.
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
CHUNK = 512


def timed_steps(engine: Engine, num_steps: int) -> list[float]:
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "routing_calibration.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(TINY), Tokenizer.from_dir(TINY)
    gen = torch.Generator().manual_seed(3)
    config = EngineConfig(max_prefill_chunk=CHUNK, max_num_batched_tokens=CHUNK + 64, max_model_len=4096)
    # prefill: each request is one fresh 512 + 1 token prompt, so its first step is one full chunk
    engine = Engine(model, tokenizer, config)
    prefill_s = []
    for i in range(args.runs + 2):
        prompt = torch.randint(10, 4000, (CHUNK + 1,), generator=gen).tolist()
        engine.add(GenerateRequest(f"p{i}", prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
        prefill_s.append(timed_steps(engine, 1)[0])
        while engine.has_work():
            engine.step()
    prefill_step_s = statistics.median(prefill_s[2:])  # the first two warm up
    decode: dict[int, float] = {}
    for batch in (1, 2, 4, 8, 16):
        engine = Engine(model, tokenizer, config)
        params = SamplingParams(max_tokens=args.runs + 8, ignore_eos=True)
        for i in range(batch):
            prompt = torch.randint(10, 4000, (32,), generator=gen).tolist()
            engine.add(GenerateRequest(f"d{batch}-{i}", prompt, params))
        timed_steps(engine, 4)  # prefills and warm-up
        decode[batch] = statistics.median(timed_steps(engine, args.runs))
    # least squares line step_s = overhead + per_seq * batch
    xs, ys = list(decode), list(decode.values())
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    per_seq_s = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    overhead_s = mean_y - per_seq_s * mean_x
    result = {
        "threads": args.threads,
        "runs": args.runs,
        "decode_step_s_by_batch": {str(k): round(v, 5) for k, v in decode.items()},
        "step_overhead_s": round(overhead_s, 5),
        "step_s_per_decoding_seq": round(per_seq_s, 6),
        "prefill_chunk_tokens": CHUNK,
        "prefill_chunk_step_s": round(prefill_step_s, 5),
        "prefill_tokens_per_s": round(CHUNK / prefill_step_s, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
