"""The MTP distillation stage: its targets are shifted as in the main training, and it trains only the
MTP blocks (every other weight bit-identical) while lowering their loss."""

from __future__ import annotations

import torch

from mimo.config import MiMoConfig
from mimo.model import MiMoForCausalLM
from training.tiny_config import tiny_config_dict
from training.train_model import init_weights, losses
from training.train_mtp import MTPSettings, distill, main_hidden, mtp_losses

VOCAB = 512


def _model() -> MiMoForCausalLM:
    torch.manual_seed(0)
    model = MiMoForCausalLM(MiMoConfig.from_hub_dict(tiny_config_dict(VOCAB, [0])))
    init_weights(model, seed=0)
    return model


def test_mtp_losses_use_the_main_trainings_shift() -> None:
    model = _model()
    seqs = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    length = seqs.shape[1] - 1 - model.config.num_mtp_layers
    with torch.no_grad():
        ours = mtp_losses(model, seqs, main_hidden(model, seqs, length), first_slot=0)
        _, reference = losses(model, seqs, length)
    assert len(ours) == model.config.num_mtp_layers
    for a, b in zip(ours, reference, strict=True):
        assert abs(a.item() - b.item()) < 1e-5


def test_distill_trains_only_the_mtp_blocks_and_lowers_their_loss() -> None:
    model = _model()
    settings = MTPSettings(num_sequences=6, prompt_len=8, new_tokens=16, steps=12, batch_size=6, lr=3e-3)
    # a repeating pattern after a random prompt, as greedy continuations of a small model often are
    gen = torch.Generator().manual_seed(2)
    seqs = torch.cat(
        (torch.randint(0, VOCAB, (6, 8), generator=gen), torch.arange(16).remainder(5).repeat(6, 1) + 7),
        dim=1,
    )
    length = seqs.shape[1] - 1 - model.config.num_mtp_layers
    before_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = mtp_losses(model, seqs, main_hidden(model, seqs, length), settings.prompt_len - 2)
    after = distill(model, seqs, settings)
    assert sum(after) < 0.5 * sum(x.item() for x in before)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before_state[n])}
    assert changed and all(n.startswith("model.mtp.") for n in changed)
    assert not any(p.requires_grad for p in model.parameters())
