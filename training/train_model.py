"""Trains the embedded tiny MiMo (main model + its 3 MTP blocks) on offline text and synthetic chats.

Reproducible: fixed seeds, a fixed step count, 2 CPU threads. Loss = next-token CE + 0.5 x each MTP
block's CE (block k at slot i sees token i+k+1 and predicts i+k+2). MoE balance uses the release's
aux-loss-free scheme: each step nudges `e_score_correction_bias` against the measured load.
Writes a hub-format checkpoint (bf16 weights, fp32 router) beside the tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mimo.checkpoint import write_checkpoint
from mimo.config import MiMoConfig
from mimo.config_export import to_hub_dict
from mimo.model import MiMoForCausalLM
from mimo.moe import Router, Routing
from mimo.tokenizer import Tokenizer
from mimo.weights import hub_state_from_model
from training.data import TokenData, build_token_data
from training.tiny_config import tiny_config_dict

NUM_MTP_TARGETS = 3
MTP_LOSS_WEIGHT = 0.5
MTP_STRIDE = 4  # MTP losses on every 4th position (rotating offset)
BIAS_UPDATE_RATE = 1e-3


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 340
    batch_size: int = 8
    seq_len: int = 512  # covers 95% of rendered tool dialogues from the system prompt to the answer
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.05
    chat_fraction: float = 0.75
    seed: int = 1234
    threads: int = 2


def init_weights(model: MiMoForCausalLM, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    out_scale = 1.0 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(("attention_sink_bias", "e_score_correction_bias")):
                p.zero_()
            else:
                std = 0.02 * (
                    out_scale if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else 1.0
                )
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def sample_batch(data: TokenData, settings: TrainSettings, rng: random.Random, split: str) -> torch.Tensor:
    """[B, seq_len + 1 + NUM_MTP_TARGETS] token windows: chat windows start at a conversation."""
    length = settings.seq_len + 1 + NUM_MTP_TARGETS
    rows = []
    for _ in range(settings.batch_size):
        if rng.random() < settings.chat_fraction:
            rows.append(data.chat_window(split, length, rng))
        else:
            rows.append(data.text_window(split, length, rng))
    return torch.tensor(rows, dtype=torch.long)


def losses(
    model: MiMoForCausalLM, batch: torch.Tensor, seq_len: int, mtp_stride: int = 1, mtp_offset: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main CE over every position and per-MTP-block CE over every `mtp_stride`-th position.

    The MTP blocks still run over the whole window (their attention needs it); only their lm_head
    projections are subsampled, which is most of the cost of training four heads over a 4K vocab.
    """
    positions = torch.arange(seq_len)
    inputs = batch[:, :seq_len]
    hidden = model.forward_hidden(inputs, positions)
    main = F.cross_entropy(model.logits(hidden).flatten(0, 1).float(), batch[:, 1 : seq_len + 1].flatten())
    mtp_losses = []
    h = hidden
    picked = slice(mtp_offset, None, mtp_stride)
    for k in range(model.config.num_mtp_layers):
        h = model.mtp_hidden(k, batch[:, k + 1 : seq_len + k + 1], h, positions)
        target = batch[:, k + 2 : seq_len + k + 2][:, picked]
        logits = model.mtp_logits(k, h[:, picked])
        mtp_losses.append(F.cross_entropy(logits.flatten(0, 1).float(), target.flatten()))
    return main, mtp_losses


class ExpertLoad:
    """Counts tokens per expert in every router during a step (forward hooks)."""

    def __init__(self, model: MiMoForCausalLM) -> None:
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.counts = [torch.zeros(r.weight.shape[0]) for r in self.routers]
        for i, r in enumerate(self.routers):
            r.register_forward_hook(self._hook(i))

    def _hook(self, i: int):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, _inputs: object, routing: Routing) -> None:
            self.counts[i] += torch.bincount(routing.expert_ids.flatten(), minlength=self.counts[i].numel())

        return hook

    def rebalance(self) -> float:
        """Aux-loss-free update; returns the mean max/mean load ratio over layers."""
        ratios = []
        with torch.no_grad():
            for r, c in zip(self.routers, self.counts, strict=True):
                r.e_score_correction_bias.add_(BIAS_UPDATE_RATE * torch.sign(c.mean() - c))
                ratios.append(float(c.max() / c.mean().clamp(min=1.0)))
                c.zero_()
        return sum(ratios) / len(ratios)


def cosine_lr(step: int, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr_ratio` x `lr` at `steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, s: TrainSettings) -> float:
    return cosine_lr(step, s.lr, s.warmup_steps, s.steps, s.min_lr_ratio)


def train(out_dir: Path, settings: TrainSettings) -> dict[str, float]:
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    tokenizer = Tokenizer.from_dir(out_dir)
    data = build_token_data(tokenizer, seed=settings.seed)
    config = MiMoConfig.from_hub_dict(tiny_config_dict(tokenizer.vocab_size, list(tokenizer.eos_token_ids)))
    model = MiMoForCausalLM(config)
    init_weights(model, settings.seed)
    load = ExpertLoad(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    rng = random.Random(settings.seed)
    start = time.perf_counter()
    log: dict[str, float] = {}
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        batch = sample_batch(data, settings, rng, "train")
        # fp32: bf16 autocast is slower on this CPU
        main, mtp = losses(model, batch, settings.seq_len, MTP_STRIDE, step % MTP_STRIDE)
        loss = main + MTP_LOSS_WEIGHT * sum(mtp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        imbalance = load.rebalance()
        if step % 10 == 0 or step == settings.steps - 1:
            elapsed = time.perf_counter() - start
            mtp_text = " ".join(f"{x.item():.3f}" for x in mtp)
            print(
                f"step {step:5d}  loss {main.item():.3f}  mtp {mtp_text}  max/mean load {imbalance:.2f}  "
                f"{elapsed:6.0f}s",
                flush=True,
            )
            log = {"step": step, "train_loss": main.item(), "elapsed_s": elapsed}
    model.eval()
    save(model, tokenizer, out_dir)
    return log


def save(model: MiMoForCausalLM, tokenizer: Tokenizer, out_dir: Path) -> None:
    config = model.config
    state = {
        name: t.detach().to(
            torch.float32 if t.dtype == torch.float32 and _is_router(name) else torch.bfloat16
        )
        for name, t in hub_state_from_model(model).items()
    }
    for old in out_dir.glob("model*.safetensors"):
        old.unlink()
    write_checkpoint(out_dir, state)
    (out_dir / "config.json").write_text(json.dumps(to_hub_dict(config), indent=2) + "\n")
    generation = {
        "eos_token_id": list(tokenizer.eos_token_ids),
        "do_sample": False,
        "transformers_version": "5.23.0",
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _is_router(name: str) -> bool:
    return name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("checkpoints/mimo-tiny"))
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    args = parser.parse_args()
    train(args.out, TrainSettings(steps=args.steps))


if __name__ == "__main__":
    main()
