"""The `mimo` command line: `generate`, `inspect`, `serve` (and the commands added below).

Each subcommand parses its arguments, calls one library function and prints text or JSON; errors
in the user's input end with a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cluster.cli.help import DefaultsFormatter
from cluster.cli.inspect_report import deployment_memory, inspect_report, render_text
from cluster.spec import EMBEDDED_MODEL

RELEASED_CONFIG = (
    Path(__file__).resolve().parents[2] / "checkpoints" / "reference" / "mimo-v2-flash.config.json"
)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from mimo.device import pick_device
    from mimo.tokenizer import Tokenizer
    from mimo.weights import load_model
    from protocol.messages import GenerateRequest
    from protocol.sampling import SamplingParams
    from replicas.engine.engine import Engine
    from replicas.engine.engine_config import EngineConfig, single_sequence_budget

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = load_model(args.model, dtype=dtype, device=pick_device(args.device), progress=False)
    tokenizer = Tokenizer.from_dir(args.model)
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        prompt_ids = tokenizer.encode_chat(messages, enable_thinking=args.thinking)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=not args.chat,  # plain text continues; a chat turn ends at <|im_end|>
    )
    # size the KV cache for this one sequence rather than a server's default budget
    max_len = min(len(prompt_ids) + args.max_tokens + 1, model.config.max_position_embeddings)
    config = EngineConfig(
        num_mtp_drafts=args.mtp,
        kv_dtype_bytes=torch.finfo(dtype).bits // 8,
        max_model_len=max_len,
        max_num_batched_tokens=512,
        max_prefill_chunk=512,
    )
    config = replace(config, kv_cache_bytes=single_sequence_budget(model.config, config, max_len))
    engine = Engine(model, tokenizer, config)
    start = time.perf_counter()
    chunks = engine.generate([GenerateRequest("cli", prompt_ids, params)])["cli"]
    elapsed = time.perf_counter() - start
    token_ids = [t for c in chunks for t in c.token_ids]
    if chunks and chunks[-1].error:
        raise ValueError(chunks[-1].error)
    text = "".join(c.text for c in chunks)
    if args.json:
        record = {
            "prompt_token_ids": prompt_ids,
            "token_ids": token_ids,
            "text": text,
            "finish_reason": chunks[-1].finish_reason if chunks else None,
            "elapsed_s": round(elapsed, 4),
        }
        print(json.dumps(record))
    else:
        print(text)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from mimo.config import MiMoConfig

    config = MiMoConfig.from_file(args.path)
    report = inspect_report(config, args.context)
    if args.shards is not None:
        report["deployment"] = deployment_memory(
            config,
            num_shards=args.shards,
            num_redundant=args.redundant,
            weight_dtype=args.weight_dtype,
            kv_seqs=args.kv_seqs,
            context=args.context,
        )
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from cluster.cli.plan import (
        load_hardware,
        load_traffic,
        model_numbers,
        plan_json,
        render_text,
        write_chart,
    )
    from mimo.config import MiMoConfig
    from observability.capacity import plan

    config = MiMoConfig.from_file(args.model)
    numbers = model_numbers(
        config, args.weight_format, name=args.model.stem if args.model.is_file() else args.model.name
    )
    hardware, traffic = load_hardware(args.hardware), load_traffic(args.traffic)
    result = plan(numbers, hardware, traffic)
    print(json.dumps(plan_json(result), indent=2) if args.json else render_text(result))
    if args.chart is not None:
        write_chart(args.chart, numbers, hardware, traffic)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimo", description="MiMo-V2-Flash serving cluster", formatter_class=DefaultsFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", formatter_class=DefaultsFormatter, help="generate text with the engine on one checkpoint"
    )
    gen.add_argument("--model", type=Path, default=EMBEDDED_MODEL, help="checkpoint directory (hub format)")
    gen.add_argument("--prompt", required=True, help="prompt text (a user message with --chat)")
    gen.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    gen.add_argument("--thinking", action="store_true", help="with --chat: enable_thinking=true")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, random)")
    gen.add_argument("--mtp", type=int, default=0, help="MTP draft tokens per step (0 = off, up to 3)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    gen.add_argument(
        "--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
    )
    gen.add_argument("--json", action="store_true", help="print one JSON line with token ids and timing")
    gen.set_defaults(func=_generate)

    ins = sub.add_parser(
        "inspect",
        formatter_class=DefaultsFormatter,
        help="layers, parameters and KV sizes of a checkpoint or config.json",
    )
    ins.add_argument("path", type=Path, help="checkpoint directory or config.json")
    ins.add_argument("--context", type=int, default=262144, help="sequence length for the KV figures")
    ins.add_argument("--json", action="store_true", help="print JSON instead of text")
    ins.add_argument(
        "--shards",
        type=int,
        default=None,
        help="size a deployment with this many expert shards (default: none, no deployment sizing)",
    )
    ins.add_argument("--redundant", type=int, default=0, help="redundant expert copies in the pool (EPLB)")
    ins.add_argument(
        "--weight-dtype",
        choices=["fp8", "bf16", "fp32"],
        default="fp8",
        help="dtype the weights are sized in",
    )
    ins.add_argument(
        "--kv-seqs", type=int, default=1, help="sequences of --context tokens per attention replica"
    )
    ins.set_defaults(func=_inspect)

    pln = sub.add_parser(
        "plan",
        formatter_class=DefaultsFormatter,
        help="attention replicas, expert shards and GPUs for a traffic profile",
    )
    pln.add_argument(
        "--model",
        type=Path,
        default=RELEASED_CONFIG,
        help="checkpoint directory or config.json (default: the release)",
    )
    pln.add_argument(
        "--traffic",
        type=Path,
        required=True,
        help="traffic profile (YAML/JSON), e.g. observability/profiles/chat.yaml",
    )
    pln.add_argument(
        "--hardware",
        type=Path,
        required=True,
        help="hardware profile (YAML/JSON), e.g. observability/profiles/h200.yaml",
    )
    pln.add_argument(
        "--weight-format",
        choices=["fp8", "bf16", "fp32"],
        default="fp8",
        help="dtype the weights are sized in",
    )
    pln.add_argument("--json", action="store_true", help="print JSON instead of text")
    pln.add_argument(
        "--chart",
        type=Path,
        default=None,
        help="write a PNG of cost against load here (default: none, no chart)",
    )
    pln.set_defaults(func=_plan)

    from cluster.cli.serve import add_parser as add_serve_parser

    add_serve_parser(sub)
    from cluster.cli.render import add_parser as add_render_parser

    add_render_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ValueError, FileNotFoundError) as e:  # InvalidRequest is a ValueError too
        print(f"mimo {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
