"""The CUDA twin of every engine path, checked on a GPU host: `pytest tests/gpu` (CI has no GPU).

Each check compares against an independent result on the same inputs: transformers 5.23's
MiMoV2FlashForCausalLM on the same GPU, or our engine on the CPU. TF32 is off so fp32 is fp32.
Covered: the paged engine (chunked prefill, SWA block release, prefix cache, preemption), MTP drafts,
seeded sampling with logprobs, expert shards loaded on the GPU behind the dispatcher, and bf16.
Not covered here: Ray actors and NCCL (one GPU; NCCL cannot put two ranks on one device).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from mimo.device import pick_device
from mimo.generate import SamplingParams as PlainParams
from mimo.generate import generate
from mimo.model import MiMoForCausalLM
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import Chunk, GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from replicas.experts.dispatch import ExpertDispatcher
from replicas.experts.expert_placement import initial_placement
from replicas.experts.expert_shard import ExpertShard
from replicas.experts.transport_local import InProcessTransport
from tests.factory import random_config_dict, write_random_checkpoint

# MIMO_TEST_DEVICE=cpu dry-runs the checks' own logic on a host without a GPU
DEVICE = os.environ.get("MIMO_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)
transformers = pytest.importorskip("transformers")

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "mimo-tiny"
NEW_TOKENS = 40
TEXTS = [
    "def fibonacci(n):",
    "The weather in Oslo is",
    "import numpy as np\n\nclass Matrix:",
    "Once upon a time, in a small village by the sea,",
    "SELECT name, count(*) FROM users",
]


@pytest.fixture(autouse=True)
def strict_fp32() -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(TINY)


def _prompts() -> list[list[int]]:
    """Short prompts, two sharing a long prefix (prefix cache), one far past the 64-token window."""
    tok = _tokenizer()
    prompts = [tok.encode(t) for t in TEXTS]
    story = tok.encode(" ".join(TEXTS) * 12)[:700]
    return [*prompts, story, story[:500] + tok.encode(" and then")]


def _engine(
    model: MiMoForCausalLM,
    drafts: int,
    kv_mib: float = 64,
    max_model_len: int = 2048,
    dispatcher: ExpertDispatcher | None = None,
) -> Engine:
    config = EngineConfig(
        num_mtp_drafts=drafts, kv_cache_bytes=int(kv_mib * 2**20), max_model_len=max_model_len,
        max_num_batched_tokens=512, max_prefill_chunk=256, block_size=16,
        kv_dtype_bytes=model.lm_head.weight.element_size(),
    )  # fmt: skip
    return Engine(model, _tokenizer(), config, dispatcher)


def _greedy_tokens(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    out = engine.generate([GenerateRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
    return [_tokens(out[f"r{i}"]) for i in range(len(prompts))]


def _tokens(chunks: list[Chunk]) -> list[int]:
    assert all(c.error is None for c in chunks), [c.error for c in chunks]
    return [t for c in chunks for t in c.token_ids]


def transformers_greedy(path: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The reference: transformers' own model from the same files on DEVICE, greedy, EOS ignored."""
    ref = transformers.MiMoV2FlashForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=DEVICE)
        with torch.no_grad():
            out = ref.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        outs.append(out[0, len(prompt) :].tolist())
    del ref
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return outs


@lru_cache(maxsize=1)
def _transformers_greedy() -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t) for t in transformers_greedy(TINY, _prompts(), NEW_TOKENS))


def _free_blocks_all_back(engine: Engine) -> None:
    usage = engine.kv_cache.usage()
    assert all(u.num_used == 0 for u in usage.values()), usage


@pytest.mark.parametrize("drafts", [0, 3])
def test_trained_tiny_engine_on_cuda_matches_transformers_on_cuda(drafts: int) -> None:
    """Catches any CUDA-only deviation in paged attention (window edge, sinks), chunked prefill,
    prefix reuse or MTP verification: greedy tokens must equal the reference's, one by one."""
    model = load_model(TINY, dtype=torch.float32, device=DEVICE)
    engine = _engine(model, drafts)
    assert engine.device.type == torch.device(DEVICE).type
    got = _greedy_tokens(engine, _prompts())
    assert [tuple(g) for g in got] == list(_transformers_greedy())
    _free_blocks_all_back(engine)


def test_engine_on_cuda_equals_engine_on_cpu_under_preemption() -> None:
    """A KV budget too small for the batch forces preemption by recompute on both devices."""
    prompts = _prompts()
    engine = _engine(load_model(TINY, device=DEVICE), 0, kv_mib=6, max_model_len=768)
    cuda = _greedy_tokens(engine, prompts)
    assert engine.scheduler.num_preemptions_total > 0
    cpu = _greedy_tokens(_engine(load_model(TINY, device="cpu"), 0, kv_mib=6, max_model_len=768), prompts)
    assert cuda == cpu
    assert [tuple(g) for g in cuda] == list(_transformers_greedy())


def test_seeded_sampling_on_cuda_is_the_same_whatever_the_batch() -> None:
    """Per-request generators live on the GPU; logprobs gather on the logits' device."""
    model = load_model(TINY, device=DEVICE)
    prompts = _prompts()
    params = SamplingParams(
        max_tokens=24, temperature=0.8, top_p=0.9, top_k=50, seed=7, logprobs=3, ignore_eos=True,
        presence_penalty=0.3,
    )  # fmt: skip
    for drafts in (0, 3):
        alone = _engine(model, drafts).generate([GenerateRequest("a", prompts[0], params)])["a"]
        others = [
            GenerateRequest(f"o{i}", p, SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True))
            for i, p in enumerate(prompts[1:])
        ]
        batched = _engine(model, drafts).generate([*others, GenerateRequest("a", prompts[0], params)])["a"]
        assert _tokens(alone) == _tokens(batched)
        lp_alone = [v for c in alone for v in (c.logprobs.logprobs if c.logprobs else [])]
        lp_batched = [v for c in batched for v in (c.logprobs.logprobs if c.logprobs else [])]
        assert len(lp_alone) == 24
        torch.testing.assert_close(torch.tensor(lp_alone), torch.tensor(lp_batched), rtol=0, atol=1e-4)


def test_random_checkpoint_logits_match_transformers_on_cuda(tmp_path: Path) -> None:
    cfg = random_config_dict()
    write_random_checkpoint(tmp_path, cfg, seed=1)
    ours = load_model(tmp_path, device=pick_device(DEVICE))
    ref = transformers.MiMoV2FlashForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(DEVICE).eval()
    gen = torch.Generator().manual_seed(0)
    for n in (1, 9, 40):
        prompt = torch.randint(0, cfg["vocab_size"], (n,), generator=gen).tolist()
        ids = torch.tensor([prompt], device=DEVICE)
        with torch.no_grad():
            ref_logits = ref(ids).logits[0]
            our_logits = ours.logits(ours.forward_hidden(ids, torch.arange(n, device=DEVICE)))[0]
        assert (ref_logits - our_logits).abs().max().item() < 1e-4
        cpu_tokens = generate(load_model(tmp_path), prompt, PlainParams(max_new_tokens=16)).token_ids
        assert generate(ours, prompt, PlainParams(max_new_tokens=16)).token_ids == cpu_tokens


@pytest.mark.parametrize("num_shards", [2, 4])
def test_expert_shards_on_cuda_behind_the_dispatcher_equal_the_whole_model(num_shards: int) -> None:
    """Shards loaded on the GPU (only their experts); the attention side holds no expert weights."""
    config = load_model(TINY, experts="none", device=DEVICE).config
    moe_layers = [i for i, m in enumerate(config.is_moe_layer) if m]
    placement = initial_placement(moe_layers, config.num_experts, num_shards)
    shards = [ExpertShard.load(TINY, placement.experts_of_shard(s), device=DEVICE) for s in range(num_shards)]
    attention = load_model(TINY, experts="none", device=DEVICE)
    dispatcher = ExpertDispatcher(InProcessTransport(shards), placement, config.num_experts)
    engine = _engine(attention, 3, dispatcher=dispatcher)
    got = _greedy_tokens(engine, _prompts())
    assert [tuple(g) for g in got] == list(_transformers_greedy())
    counts = [shard.drain_stats().token_counts for shard in shards]
    assert all(counts), "every shard computed rows"


def test_bf16_engine_on_cuda_serves_a_batch_and_frees_its_blocks() -> None:
    """bf16 weights and KV: masks, RoPE tables and sampler run in the model's dtype on the GPU; the
    tokens are compared with our dense bf16 forward on the same GPU, allowing for near-ties."""
    model = load_model(TINY, dtype=torch.bfloat16, device=DEVICE)
    engine = _engine(model, 0)
    prompts = _prompts()
    got = _greedy_tokens(engine, prompts)
    _free_blocks_all_back(engine)
    same = 0
    for prompt, tokens in zip(prompts, got, strict=True):
        dense = generate(model, prompt, PlainParams(max_new_tokens=NEW_TOKENS)).token_ids
        agree = next((i for i, (a, b) in enumerate(zip(tokens, dense, strict=True)) if a != b), len(tokens))
        same += agree
    assert same >= 0.8 * NEW_TOKENS * len(prompts), f"{same} leading tokens agree"
