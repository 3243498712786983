"""FP8 expert shards: an FP8 checkpoint's experts stay FP8 in memory (the bytes `mimo inspect` gives
a shard), are dequantized per call, and compute exactly what a shard dequantized at load computes:
per kernel, after an EPLB subset, and through the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cluster.cli.inspect_report import deployment_memory
from cluster.cli.main import EMBEDDED_MODEL
from mimo.config import MiMoConfig
from mimo.fp8 import FP8_DTYPE
from mimo.moe import Experts
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from replicas.experts.dispatch import ExpertDispatcher
from replicas.experts.expert_placement import initial_placement
from replicas.experts.expert_shard import ExpertShard
from replicas.experts.fp8_experts import FP8Experts
from replicas.experts.transport_local import InProcessTransport
from tests.factory import random_config_dict, write_random_checkpoint

NUM_EXPERTS = 16
NUM_SHARDS = 2
MOE_LAYERS = list(range(1, 7))
# Ragged blocks (64 = 48 + 16, 32 = 24 + 8): a scale read from the wrong tile changes some weights.
FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [24, 48],
    "ignored_layers": [],
}
KERNELS = ("_single_token", "_union", "_dense", "_padded", "_grouped")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp8")
    write_random_checkpoint(
        path, random_config_dict(max_position_embeddings=512), quantization_config=FP8_CONFIG
    )
    return path


def _shards(path: Path, dtype: torch.dtype, keep_fp8: bool) -> list[ExpertShard]:
    placement = initial_placement(MOE_LAYERS, NUM_EXPERTS, NUM_SHARDS)
    return [
        ExpertShard.load(path, placement.experts_of_shard(s), dtype, keep_fp8=keep_fp8)
        for s in range(NUM_SHARDS)
    ]


@pytest.fixture
def kernel_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The `Experts` kernels called, in order."""
    log: list[str] = []
    for name in KERNELS:
        original = getattr(Experts, name)

        def spy(self: Experts, *args: object, _name: str = name, _original: object = original) -> object:
            log.append(_name)
            return _original(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(Experts, name, spy)
    yield log


def _reachable_bytes(root: object) -> int:
    """Bytes of every distinct tensor storage reachable from `root`'s attributes (meta excluded):
    counts what a shard really keeps alive, whatever attribute holds it."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not obj.is_meta:
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def test_fp8_shard_holds_the_bytes_inspect_gives(checkpoint: Path) -> None:
    """Catches FP8 experts dequantized at load (or a dequantized copy kept after a call): resident
    bytes would be 2-4x `mimo inspect`'s FP8 figure instead of within 5% of it."""
    config = MiMoConfig.from_file(checkpoint)
    inspect_bytes = deployment_memory(
        config, num_shards=NUM_SHARDS, num_redundant=0, weight_dtype="fp8", kv_seqs=0, context=1
    )["bytes_per_expert_shard"]
    for dtype in DTYPES:
        fp8, dequantized = _shards(checkpoint, dtype, True)[0], _shards(checkpoint, dtype, False)[0]
        assert all(isinstance(m, FP8Experts) and m.gate.q.dtype == FP8_DTYPE for m in fp8.experts.values())
        assert all(isinstance(m, Experts) for m in dequantized.experts.values())
        x = torch.randn(8, config.hidden_size)
        ids = torch.randint(0, NUM_EXPERTS, (8, config.num_experts_per_tok))
        for shard in (fp8, dequantized):
            for layer in MOE_LAYERS:
                shard.compute(layer, x, ids, torch.rand(ids.shape))
        held = _reachable_bytes(fp8)
        assert fp8.weight_bytes <= held <= 1.05 * inspect_bytes, (held, inspect_bytes)
        assert held >= 0.95 * inspect_bytes
        assert _reachable_bytes(dequantized) >= dequantized.weight_bytes >= 1.9 * held


def _routing(case: str, num_rows: int, held: list[int], gen: torch.Generator) -> torch.Tensor:
    """[num_rows, 4] global expert ids; NOT_HERE (16) for pairs another shard computes."""
    if case in ("few", "gaps"):  # rows within 3 (or 6) of the 8 held experts, and one elsewhere
        num_held = 3 if case == "few" else 6
        pool = torch.tensor(held[:num_held] + [e for e in range(NUM_EXPERTS) if e not in held][:1])
        ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:4]] for _ in range(num_rows)])
    else:
        ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:4] for _ in range(num_rows)])
        if case == "skewed":  # one expert takes every row: per-expert batches, not padding
            ids[:, 0] = held[0]
            ids[:, 1:] = torch.where(ids[:, 1:] == held[0], held[1], ids[:, 1:])
    is_held = torch.isin(ids, torch.tensor(held))
    return torch.where(is_held, ids, torch.full_like(ids, NUM_EXPERTS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("case", "num_rows", "kernel"),
    [
        ("random", 1, "_single_token"),
        ("few", 4, "_union"),
        ("random", 8, "_dense"),
        ("gaps", 8, "_dense"),  # unchosen experts inside the dense batch: zeros, not garbage
        ("random", 64, "_padded"),
        ("skewed", 600, "_grouped"),
    ],
)
def test_fp8_shard_computes_what_the_dequantized_shard_computes(
    checkpoint: Path, kernel_log: list[str], dtype: torch.dtype, case: str, num_rows: int, kernel: str
) -> None:
    """Catches a scale applied to the wrong tile or expert, gate/up/down mixed up, dequant math that
    differs from the load path's, unchosen experts left uninitialised, or a kernel choice that
    differs from the dequantized shard's (e.g. running only the chosen experts turns a union into a
    dense batch)."""
    fp8, dequantized = _shards(checkpoint, dtype, True)[0], _shards(checkpoint, dtype, False)[0]
    gen = torch.Generator().manual_seed(num_rows)
    hidden = fp8.config.hidden_size
    for layer in MOE_LAYERS:
        held = [e for held_layer, e in fp8.keys if held_layer == layer]
        x = torch.randn(num_rows, hidden, generator=gen)
        ids = _routing(case, num_rows, held, gen)
        weights = torch.rand(ids.shape, generator=gen)
        kernel_log.clear()
        want = dequantized.compute(layer, x, ids, weights)
        expected_kernels = list(kernel_log)
        kernel_log.clear()
        got = fp8.compute(layer, x, ids, weights)
        assert expected_kernels == [kernel] and kernel_log == expected_kernels
        assert torch.equal(got, want), (layer, (got - want).abs().max())


def test_subset_of_an_fp8_shard_stays_fp8_and_exact(checkpoint: Path) -> None:
    """Catches EPLB's subset dequantizing FP8 experts (or keeping the whole stack alive through a
    view), or slicing scales out of step with their weights."""
    fp8, dequantized = (
        _shards(checkpoint, torch.float32, True)[1],
        _shards(checkpoint, torch.float32, False)[1],
    )
    keys = [(layer, e) for layer, e in fp8.keys if e % 4 == 1 or layer == 2]
    fp8_sub, dequantized_sub = fp8.subset(keys), dequantized.subset(keys)
    assert fp8_sub.keys == keys
    assert all(isinstance(m, FP8Experts) for m in fp8_sub.experts.values())
    assert fp8_sub.weight_bytes * len(fp8.keys) == fp8.weight_bytes * len(keys)
    gen = torch.Generator().manual_seed(1)
    for layer in MOE_LAYERS:
        for num_rows in (1, 8, 64):
            x = torch.randn(num_rows, fp8.config.hidden_size, generator=gen)
            ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:4] for _ in range(num_rows)])
            weights = torch.rand(ids.shape, generator=gen)
            want = dequantized_sub.compute(layer, x, ids, weights)
            assert torch.equal(fp8_sub.compute(layer, x, ids, weights), want)


def _engine_outputs(path: Path, shards: list[ExpertShard]) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs from an engine whose experts run on `shards`."""
    placement = initial_placement(MOE_LAYERS, NUM_EXPERTS, NUM_SHARDS)
    dispatcher = ExpertDispatcher(InProcessTransport(shards), placement, NUM_EXPERTS)
    config = EngineConfig(block_size=4, max_model_len=256, num_mtp_drafts=2)
    engine = Engine(load_model(path, experts="none"), Tokenizer.from_dir(EMBEDDED_MODEL), config, dispatcher)
    prompts = [[5, 6, 7], list(range(10, 50)), [9] * 17, list(range(100, 130))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    out = engine.generate([GenerateRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
    results = []
    for i in range(len(prompts)):
        chunks = out[f"r{i}"]
        assert all(c.error is None for c in chunks)
        tokens = [t for c in chunks for t in c.token_ids]
        logprobs = [lp for c in chunks if c.logprobs is not None for lp in c.logprobs.logprobs]
        assert len(logprobs) == len(tokens) == 12
        results.append((tokens, logprobs))
    return results


def test_engine_over_fp8_shards_equals_engine_over_dequantized_shards(
    checkpoint: Path, one_thread: None
) -> None:
    """Catches any difference the FP8 shards make to served outputs (prefill chunks, decode, MTP
    verify through the dispatcher): greedy tokens and their logprobs must be equal, not close."""
    fp8 = _engine_outputs(checkpoint, _shards(checkpoint, torch.float32, True))
    dequantized = _engine_outputs(checkpoint, _shards(checkpoint, torch.float32, False))
    assert fp8 == dequantized
    assert len({t for tokens, _ in fp8 for t in tokens}) > 4  # not a degenerate repeat of one token
