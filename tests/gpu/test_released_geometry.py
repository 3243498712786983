"""The released model's geometry on CUDA, against transformers 5.23 on the same GPU (`pytest tests/gpu`).

The tiny model and the CPU tests shrink every dimension; this check keeps the release's: hidden
4,096, 64 query heads over 4 (GA) and 8 (SWA) KV heads, q/k head dim 192 and v 128, window 128 with
sinks on SWA layers, partial RoPE with both thetas, top-8 sigmoid routing over experts of the
real 4,096 x 2,048 size, a dense layer 0 of 16,384. Reduced only in count: 3 layers (GA dense, SWA
MoE, GA MoE) of 48, 16 experts of 256, 1 MTP block of 3, a 32,768-token vocabulary of 152,576.
Random fp32 weights written in hub format, read by both sides. `MIMO_GEOMETRY_SCALE=8` divides
the hidden and MLP sizes (not heads or head dims) to dry-run the check on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from tests.factory import random_config_dict, write_random_checkpoint
from tests.gpu.test_cuda import DEVICE, TINY, transformers_greedy

pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)

SCALE = int(os.environ.get("MIMO_GEOMETRY_SCALE", "1"))
NEW_TOKENS = 12


def released_geometry() -> dict[str, object]:
    return random_config_dict(
        num_layers=3,
        vocab_size=32_768,
        hidden_size=4_096 // SCALE,
        intermediate_size=16_384 // SCALE,
        moe_intermediate_size=2_048 // SCALE,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=192,
        v_head_dim=128,
        swa_num_attention_heads=64,
        swa_num_key_value_heads=8,
        swa_head_dim=192,
        swa_v_head_dim=128,
        sliding_window_size=128,
        hybrid_layer_pattern=[0, 1, 0],
        moe_layer_freq=[0, 1, 1],
        n_routed_experts=16,
        num_experts_per_tok=8,
        max_position_embeddings=4_096,
        num_nextn_predict_layers=1,
        eos_token_id=[1],
    )


@pytest.fixture(autouse=True)
def strict_fp32() -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def test_released_geometry_engine_on_cuda_matches_transformers(tmp_path: Path) -> None:
    """Prompts of 20, 140 and 600 tokens (up to 4 windows past 128), prefilled in 512-token chunks
    (attended in 128-query blocks), MTP drafting on: greedy tokens must equal transformers' one by
    one."""
    cfg = released_geometry()
    write_random_checkpoint(tmp_path, cfg, seed=3)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, int(cfg["vocab_size"]), (n,), generator=gen).tolist() for n in (20, 140, 600)]

    expected = transformers_greedy(tmp_path, prompts, NEW_TOKENS)
    model = load_model(tmp_path, device=DEVICE)
    engine = Engine(
        model,
        Tokenizer.from_dir(TINY),  # ids only: the text it decodes is not checked
        EngineConfig(
            num_mtp_drafts=1, kv_cache_bytes=256 * 2**20, max_model_len=1024, block_size=16,
            max_num_batched_tokens=1024, max_prefill_chunk=512,
        ),
    )  # fmt: skip
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    out = engine.generate([GenerateRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
    got = [[t for c in out[f"r{i}"] for t in c.token_ids] for i in range(len(prompts))]
    assert got == expected
