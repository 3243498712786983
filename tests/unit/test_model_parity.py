"""Our model against transformers 5.23's native MiMoV2FlashForCausalLM (the independent reference).

Random checkpoints written in hub format are read by both sides from the same files; logits must
agree within 1e-4 in fp32 and greedy generations token for token, on prompts several windows long.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimo.generate import SamplingParams, generate
from mimo.weights import load_model
from tests.factory import random_config_dict, write_random_checkpoint

transformers = pytest.importorskip("transformers")


def _reference(path: Path) -> torch.nn.Module:
    model = transformers.MiMoV2FlashForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def _assert_parity(path: Path, prompts: list[list[int]], new_tokens: int) -> None:
    ours = load_model(path, dtype=torch.float32)
    ref = _reference(path)
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref_logits = ref(ids).logits[0]
            our_logits = ours.logits(ours.forward_hidden(ids, torch.arange(len(prompt))))[0]
        assert (ref_logits - our_logits).abs().max().item() < 1e-4
        with torch.no_grad():
            ref_out = ref.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        our_out = generate(ours, prompt, SamplingParams(max_new_tokens=new_tokens)).token_ids
        assert our_out == ref_out


def test_random_checkpoint_matches_transformers(tmp_path: Path) -> None:
    """Catches any deviation in attention (window edge, sinks, v-scale, partial RoPE), routing or norms."""
    cfg = random_config_dict()
    write_random_checkpoint(tmp_path, cfg, seed=1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=gen).tolist() for n in (1, 7, 9, 40)]
    _assert_parity(tmp_path, prompts, new_tokens=24)


def test_other_dims_sharded_checkpoint_matches_transformers(tmp_path: Path) -> None:
    """Catches tiny-specific code paths: head dims 192/128, window 16, 64 experts top-8, 8 GA/SWA heads,
    several layers per shard file instead of the release's per-layer shards."""
    cfg = random_config_dict(
        num_layers=12,
        hidden_size=96,
        num_attention_heads=8,
        num_key_value_heads=2,
        swa_num_attention_heads=8,
        swa_num_key_value_heads=4,
        head_dim=192,
        v_head_dim=128,
        swa_head_dim=192,
        swa_v_head_dim=128,
        sliding_window_size=16,
        n_routed_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=16,
        rope_theta=1_000_000.0,
        swa_rope_theta=50_000.0,
    )
    write_random_checkpoint(tmp_path, cfg, seed=2, shard_for=lambda n: f"part-{len(n) % 3}.safetensors")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=gen).tolist() for n in (5, 17, 60)]
    _assert_parity(tmp_path, prompts, new_tokens=20)
