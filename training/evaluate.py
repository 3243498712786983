"""The tiny model's report card: held-out loss, MTP draft agreement, tool-call validity.

MTP agreement is measured where it matters for speculative decoding: on the model's own greedy
continuations, block k's draft is compared with the main model's greedy token k+2 ahead; the
conditional rate counts only slots whose earlier blocks all agreed (what a verifier would accept).
Writes `report.json` beside the checkpoint; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gateway.tool_calls import parse_tool_calls
from mimo.generate import SamplingParams, generate
from mimo.model import MiMoForCausalLM
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from training.data import TokenData, build_token_data
from training.dialogues import heldout_tool_prompts

EVAL_SEED = 4321


@torch.inference_mode()
def heldout_loss(model: MiMoForCausalLM, data: TokenData, seq_len: int, num_windows: int) -> dict[str, float]:
    rng = random.Random(EVAL_SEED)
    out = {}
    for kind in ("text", "chat"):
        total = 0.0
        for _ in range(num_windows):
            window = data.text_window if kind == "text" else data.chat_window
            ids = torch.tensor([window("heldout", seq_len + 1, rng)])
            logits = model.logits(model.forward_hidden(ids[:, :-1], torch.arange(seq_len)))
            total += F.cross_entropy(logits[0].float(), ids[0, 1:]).item()
        out[kind] = round(total / num_windows, 4)
    return out


@torch.inference_mode()
def mtp_agreement(model: MiMoForCausalLM, sequences: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """sequences: (prompt ids, the main model's greedy continuation). Per block k: the rate its draft
    equals the main greedy token, given true inputs, and given that blocks < k agreed."""
    num_blocks = model.config.num_mtp_layers
    hits = [0] * num_blocks
    cond_hits = [0] * num_blocks
    cond_total = [0] * num_blocks
    total = 0
    for prompt, generated in sequences:
        seq = prompt + generated
        ids = torch.tensor([seq])
        positions = torch.arange(len(seq))
        h = model.forward_hidden(ids, positions)
        # slots i whose next num_blocks + 1 tokens are all main-model greedy tokens
        first, last = len(prompt) - 1, len(seq) - num_blocks - 2
        if last < first:
            continue
        all_ok = torch.ones(last - first + 1, dtype=torch.bool)
        for k in range(num_blocks):
            next_ids = torch.tensor([seq[k + 1 :] + [0] * (k + 1)])
            h = model.mtp_hidden(k, next_ids, h, positions)
            draft = model.mtp_logits(k, h)[0, first : last + 1].argmax(-1)
            target = torch.tensor(seq[first + k + 2 : last + k + 3])
            ok = draft == target
            hits[k] += int(ok.sum())
            cond_total[k] += int(all_ok.sum())
            cond_hits[k] += int((ok & all_ok).sum())
            all_ok &= ok
        total += last - first + 1
    rates = [h / max(1, total) for h in hits]
    cond = [c / max(1, t) for c, t in zip(cond_hits, cond_total, strict=True)]
    accepted_prefix = [cond_hits[k] / max(1, total) for k in range(num_blocks)]
    return {
        "slots": total,
        "block_agreement": [round(r, 4) for r in rates],
        "block_agreement_given_previous": [round(r, 4) for r in cond],
        "acceptance_length_3_drafts": round(1 + sum(accepted_prefix), 4),
    }


def tool_call_validity(model: MiMoForCausalLM, tokenizer: Tokenizer, num_prompts: int) -> dict[str, Any]:
    parsed = right_tool = 0
    samples: list[str] = []
    for i, (messages, tools, expected) in enumerate(heldout_tool_prompts(num_prompts, EVAL_SEED)):
        prompt = tokenizer.encode_chat(messages, tools=tools, enable_thinking=i % 2 == 1)
        params = SamplingParams(max_new_tokens=160, stop_token_ids=tokenizer.eos_token_ids)
        text = tokenizer.decode(generate(model, prompt, params).token_ids)
        # the format alone (any function name): the gateway keeps a call to an undefined function
        # in the content, which "calling the right tool" counts as a miss
        calls = parse_tool_calls(text, None).calls
        parsed += bool(calls)
        right_tool += bool(calls) and calls[0].name == expected
        if len(samples) < 3:
            samples.append(text)
    return {
        "prompts": num_prompts,
        "parseable_rate": round(parsed / num_prompts, 4),
        "right_tool_rate": round(right_tool / num_prompts, 4),
        "samples": samples,
    }


def greedy_continuations(
    model: MiMoForCausalLM, tokenizer: Tokenizer, data: TokenData, num: int, new_tokens: int
) -> list[tuple[list[int], list[int]]]:
    """Held-out chat prompts and text prefixes with the main model's greedy continuations."""
    rng = random.Random(EVAL_SEED)
    out = []
    for i in range(num):
        if i % 2 == 0:
            messages, tools, _ = heldout_tool_prompts(1, EVAL_SEED + i)[0]
            prompt = tokenizer.encode_chat(messages, tools=tools, enable_thinking=i % 4 == 0)
        else:
            prompt = data.text_window("heldout", 48, rng)
        result = generate(model, prompt, SamplingParams(max_new_tokens=new_tokens))
        out.append((prompt, result.token_ids))
    return out


def evaluate(path: Path, *, num_prompts: int = 50, seq_len: int = 320) -> dict[str, Any]:
    torch.manual_seed(EVAL_SEED)
    model = load_model(path, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(path)
    data = build_token_data(tokenizer, seed=1234)
    report: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "heldout_loss": heldout_loss(model, data, seq_len, num_windows=40),
        "mtp": mtp_agreement(model, greedy_continuations(model, tokenizer, data, num_prompts, new_tokens=64)),
        "tool_calls": tool_call_validity(model, tokenizer, num_prompts),
        "tokens": data.num_tokens(),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("checkpoints/mimo-tiny"))
    parser.add_argument("--prompts", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    report = evaluate(args.model, num_prompts=args.prompts)
    (args.model / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
