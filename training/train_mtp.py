"""Second training stage of the tiny MiMo: its 3 MTP blocks distilled from the main model's own text.

A draft is accepted when it equals the main model's greedy token, so the blocks learn from what they
see when serving: training-split prompts (text windows and chat openings) continued greedily by the
frozen main model, block k at slot i learning the main model's token at i+k+2, chained on its own
outputs as in drafting. Only MTP block weights change; embeddings, lm_head and every main layer are
left as they are (checked before saving), so the main model's outputs stay bit-identical.
Reproducible: fixed seeds, fixed counts, 2 CPU threads.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mimo.model import MiMoForCausalLM
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from training.data import TokenData, build_token_data
from training.train_model import TrainSettings, cosine_lr, save

_MTP_PREFIX = "model.mtp."  # parameter names of the MTP blocks (nothing else is trained here)


@dataclass(frozen=True)
class MTPSettings:
    num_sequences: int = 640
    prompt_len: int = 64
    new_tokens: int = 192  # greedy, EOS ignored: what drafting sees in a long generation
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.05
    seed: int = 2024
    threads: int = 2


def distillation_prompts(data: TokenData, s: MTPSettings) -> list[list[int]]:
    """Half text windows, half chat openings, all from the training split."""
    rng = random.Random(s.seed)
    return [
        (data.text_window if i % 2 == 0 else data.chat_window)("train", s.prompt_len, rng)
        for i in range(s.num_sequences)
    ]


def greedy_sequences(
    model: MiMoForCausalLM, tokenizer: Tokenizer, prompts: list[list[int]], s: MTPSettings
) -> torch.Tensor:
    """[num_sequences, prompt_len + new_tokens]: each prompt and the main model's greedy continuation."""
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(
            max_num_seqs=64, max_num_batched_tokens=4096, kv_cache_bytes=256 * 2**20, max_model_len=1024
        ),
    )
    params = SamplingParams(max_tokens=s.new_tokens, temperature=0.0, ignore_eos=True)
    out = engine.generate([GenerateRequest(f"d{i}", p, params) for i, p in enumerate(prompts)])
    rows = []
    for i, prompt in enumerate(prompts):
        generated = [t for chunk in out[f"d{i}"] for t in chunk.token_ids]
        if len(generated) != s.new_tokens:
            raise RuntimeError(f"sequence {i}: {len(generated)} tokens generated, expected {s.new_tokens}")
        rows.append(prompt + generated)
    return torch.tensor(rows, dtype=torch.long)


@torch.inference_mode()
def main_hidden(model: MiMoForCausalLM, seqs: torch.Tensor, length: int, batch: int = 16) -> torch.Tensor:
    """[N, length, H]: the frozen main model's last hidden state at slots [0, length)."""
    positions = torch.arange(length)
    return torch.cat(
        [model.forward_hidden(seqs[i : i + batch, :length], positions) for i in range(0, len(seqs), batch)]
    )


def mtp_losses(
    model: MiMoForCausalLM, seqs: torch.Tensor, hidden: torch.Tensor, first_slot: int
) -> list[torch.Tensor]:
    """Per block k: CE of its prediction at slots i >= first_slot against seqs[i + k + 2], the blocks
    chained on their own hidden states (block 0 on the main model's)."""
    length = hidden.shape[1]
    positions = torch.arange(length)
    out = []
    h = hidden
    for k in range(model.config.num_mtp_layers):
        h = model.mtp_hidden(k, seqs[:, k + 1 : length + k + 1], h, positions)
        target = seqs[:, first_slot + k + 2 : length + k + 2]
        logits = model.mtp_logits(k, h[:, first_slot : first_slot + target.shape[1]])
        out.append(F.cross_entropy(logits.flatten(0, 1).float(), target.flatten()))
    return out


def distill(model: MiMoForCausalLM, seqs: torch.Tensor, s: MTPSettings) -> list[float]:
    """Trains the MTP blocks on `seqs` [N, prompt_len + new_tokens] (prompts and greedy continuations)
    with every other weight frozen; raises if any other weight changed. -> last step's per-block CE."""
    num_blocks = model.config.num_mtp_layers
    length = seqs.shape[1] - 1 - num_blocks  # slots whose targets for every block exist
    hidden = main_hidden(model, seqs, length)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(_MTP_PREFIX)}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(_MTP_PREFIX))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    rng = torch.Generator().manual_seed(s.seed)
    first_slot = s.prompt_len - 2  # the first slot whose block-0 target is a generated token
    start = time.perf_counter()
    losses: list[torch.Tensor] = []
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, s.lr, s.warmup_steps, s.steps, s.min_lr_ratio)
        rows = torch.randint(0, len(seqs), (s.batch_size,), generator=rng)
        losses = mtp_losses(model, seqs[rows], hidden[rows], first_slot)
        opt.zero_grad(set_to_none=True)
        torch.stack(losses).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0 or step == s.steps - 1:
            text = " ".join(f"{x.item():.3f}" for x in losses)
            print(f"step {step:4d}  mtp {text}  {time.perf_counter() - start:6.0f}s", flush=True)
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        if name in frozen and not torch.equal(p.detach(), frozen[name]):
            raise RuntimeError(f"{name} changed: only MTP blocks may be trained")
    model.eval()
    return [x.item() for x in losses]


def train_mtp(path: Path, s: MTPSettings) -> None:
    """Distills the MTP blocks of the checkpoint at `path` and writes it back in place."""
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    start = time.perf_counter()
    model = load_model(path, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(path)
    data = build_token_data(tokenizer, seed=TrainSettings.seed)  # the main model's train/held-out split
    seqs = greedy_sequences(model, tokenizer, distillation_prompts(data, s), s)
    print(f"{len(seqs)} greedy sequences in {time.perf_counter() - start:.0f}s", flush=True)
    distill(model, seqs, s)
    save(model, tokenizer, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("checkpoints/mimo-tiny"))
    parser.add_argument("--steps", type=int, default=MTPSettings.steps)
    args = parser.parse_args()
    train_mtp(args.model, MTPSettings(steps=args.steps))


if __name__ == "__main__":
    main()
