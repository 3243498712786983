"""Sampling with MTP drafts keeps the model's distribution: the first two sampled tokens follow the
exact joint distribution computed from the plain model, with drafts on (rejection sampling) and off."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.cli.main import EMBEDDED_MODEL
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig

NUM_SAMPLES = 1200


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at z (3.09: p = 0.001)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


@torch.inference_mode()
def _exact_joint(model: torch.nn.Module, prompt: list[int]) -> dict[tuple[int, int], float]:
    def next_probs(ids: list[int]) -> torch.Tensor:
        hidden = model.forward_hidden(torch.tensor([ids]), torch.arange(len(ids)))
        return torch.softmax(model.logits(hidden[:, -1]).float()[0], -1)

    p1 = next_probs(prompt)
    joint = {}
    for t1 in torch.nonzero(p1 > 1e-3).flatten().tolist():
        p2 = next_probs([*prompt, t1])
        for t2 in torch.nonzero(p2 > 1e-4).flatten().tolist():
            joint[(t1, t2)] = float(p1[t1] * p2[t2])
    return joint


@pytest.mark.parametrize("drafts", [0, 3])
def test_first_two_tokens_follow_the_model(drafts: int) -> None:
    """Catches a biased acceptance rule (e.g. accepting drafts without the p/q test, or a wrong
    residual on rejection), which would shift the second token's distribution."""
    model = load_model(EMBEDDED_MODEL)
    tokenizer = Tokenizer.from_dir(EMBEDDED_MODEL)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Tell me about the weather in Oslo."}])
    joint = _exact_joint(model, prompt)
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=64, num_mtp_drafts=drafts, max_model_len=512))
    requests = [
        GenerateRequest(
            f"s{i}", prompt, SamplingParams(max_tokens=2, temperature=1.0, seed=i, ignore_eos=True)
        )
        for i in range(NUM_SAMPLES)
    ]
    out = engine.generate(requests)
    counts: dict[tuple[int, int], int] = {}
    for chunks in out.values():
        ids = [t for c in chunks for t in c.token_ids]
        counts[(ids[0], ids[1])] = counts.get((ids[0], ids[1]), 0) + 1
    if drafts:
        assert engine.stats["accepted_draft_tokens"] > 0  # the acceptance path really ran
        assert engine.stats["accepted_draft_tokens"] < engine.stats["drafted_tokens"]  # and rejections
    cells = [k for k, p in joint.items() if p * NUM_SAMPLES >= 5]
    other_p = 1.0 - sum(joint[k] for k in cells)
    chi2 = sum((counts.get(k, 0) - joint[k] * NUM_SAMPLES) ** 2 / (joint[k] * NUM_SAMPLES) for k in cells)
    other_count = NUM_SAMPLES - sum(counts.get(k, 0) for k in cells)
    if other_p * NUM_SAMPLES >= 5:
        chi2 += (other_count - other_p * NUM_SAMPLES) ** 2 / (other_p * NUM_SAMPLES)
        dof = len(cells)
    else:
        dof = len(cells) - 1
    assert dof >= 3
    assert chi2 < _chi2_critical(dof), (chi2, dof)
