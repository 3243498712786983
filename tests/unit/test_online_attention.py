"""GA prefill attention key block by key block (online softmax) against the plain softmax over every
key: the kernel on random tensors, and whole greedy generations of the tiny model on a long prompt."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import replicas.engine.attention_batch as attention_batch
import replicas.engine.online_attention as online_module
import replicas.engine.paged_attention as paged_module
from cluster.spec import EMBEDDED_MODEL
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from replicas.engine.online_attention import causal_for, online_attention


def _plain(
    qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int], sink: torch.Tensor | None,
    num_kv_heads: int, group: int, num_q: int,
) -> torch.Tensor:  # fmt: skip
    """softmax over every visible key, the sink as one more logit column with no value (MODEL.md)."""
    num_keys = k.shape[-1]
    b = len(starts)
    q_pos = torch.tensor(starts)[:, None] + torch.arange(num_q)[None, :]  # [B, Q]
    hidden = torch.arange(num_keys)[None, None, :] > q_pos[..., None]  # [B, Q, S]
    mask = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))
    mask = mask[None, :, None].expand(num_kv_heads, b, group, num_q, num_keys)
    if sink is not None:
        mask = torch.cat((mask, sink.expand(num_kv_heads, b, group, num_q, 1)), dim=-1)
        k = torch.cat((k, torch.zeros_like(k[..., :1])), dim=-1)
        v = torch.cat((v, torch.zeros_like(v[:, :1])), dim=1)
    mask = mask.reshape(num_kv_heads * b, group * num_q, -1)
    return torch.bmm(torch.softmax(torch.baddbmm(mask, qg, k), dim=-1), v)


@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize(("key_block", "row_block"), [(64, 24), (1024, 1024)])
def test_online_softmax_equals_plain_softmax(
    with_sink: bool, key_block: int, row_block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a running max or sum not rescaled when a later key block raises the max, a causal
    mask off by one on a block crossing the diagonal (or applied to a block wholly in the past), a
    query block that stops short of its last visible key, a sink added per block instead of once,
    and padding keys past a segment's end being seen: three segments of 150 queries started at 0,
    37 and 600 over 750 gathered keys, in fp32, equal the plain softmax to ~1e-6."""
    monkeypatch.setattr(online_module, "ONLINE_KEYS", key_block)
    monkeypatch.setattr(online_module, "ONLINE_ROWS", row_block)
    gen = torch.Generator().manual_seed(0)
    num_kv_heads, group, num_q, dqk, dv = 2, 4, 150, 48, 32
    starts = [0, 37, 600]
    num_keys = max(starts) + num_q
    hb = num_kv_heads * len(starts)
    qg = torch.randn(hb, group * num_q, dqk, generator=gen) * 0.3
    # keys far apart in size, so later blocks do raise the running max
    k = torch.randn(hb, dqk, num_keys, generator=gen) * torch.linspace(0.2, 2.0, num_keys)
    v = torch.randn(hb, num_keys, dv, generator=gen)
    sink = torch.randn(num_kv_heads, 1, group, 1, 1, generator=gen) * 3 if with_sink else None
    causal = causal_for(torch.tensor(starts), torch.device("cpu"))
    got = online_attention(qg, k, v, num_keys, causal, sink, num_kv_heads, group)
    ref = _plain(qg, k, v, starts, sink, num_kv_heads, group, num_q)
    torch.testing.assert_close(got, ref, rtol=4e-6, atol=1e-6)  # fp32 sums in another order


def _greedy(prompt: list[int], num_tokens: int) -> list[int]:
    model = load_model(EMBEDDED_MODEL)
    config = EngineConfig(max_prefill_chunk=512, max_num_batched_tokens=512, max_model_len=4096)
    engine = Engine(model, Tokenizer.from_dir(EMBEDDED_MODEL), config)
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    chunks = engine.generate([GenerateRequest("r", prompt, params)])["r"]
    return [t for c in chunks for t in c.token_ids]


def test_tiny_model_long_prompt_greedy_tokens_equal_plain_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the blockwise GA path changing what the served engine generates: a 2,600-token prompt
    in 512-token chunks (GA chunks over up to 2,600 keys, three 1,024-key blocks) decodes the same
    12 greedy tokens as with every GA chunk attended by the plain softmax over all its keys."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 4000, (2600,), generator=gen).tolist()
    calls: list[int] = []
    online = paged_module.online_attention

    def counted(*args: Any) -> torch.Tensor:
        calls.append(1)
        return online(*args)

    monkeypatch.setattr(paged_module, "online_attention", counted)
    blockwise = _greedy(prompt, 12)
    assert len(calls) == 2 * 6  # 2 GA layers x 6 chunks; decode steps attend whole
    monkeypatch.setattr(attention_batch, "ONLINE_MIN_QUERIES", 10**9)
    plain = _greedy(prompt, 12)
    assert len(calls) == 2 * 6
    assert blockwise == plain
