"""The capacity model (observability/capacity.py, cluster/cli/plan.py, `mimo plan`): KV and weight
arithmetic exact on the released config and equal to what the real engine and model hold on the
tiny checkpoint; the H200 plan meets its SLOs and is the smallest that does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.cli.main import EMBEDDED_MODEL, main
from cluster.cli.plan import PROFILES, load_hardware, load_traffic, model_numbers
from mimo.config import MiMoConfig
from mimo.sizes import kv_bytes_for_sequence
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from observability.capacity import GB, _check, kv_bytes_for_length, kv_bytes_held, kv_bytes_per_token, plan
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig

RELEASE = Path(__file__).resolve().parents[2] / "checkpoints" / "reference" / "mimo-v2-flash.config.json"


@pytest.fixture(scope="module")
def release() -> MiMoConfig:
    return MiMoConfig.from_file(RELEASE)


def test_release_kv_bytes_match_the_readme_and_mimo_sizes(release: MiMoConfig) -> None:
    """Catches KV per token drifting from the hybrid layout (GA 4 heads x (192 + 128) x 2 B, SWA 8
    heads) and the planner disagreeing with mimo.sizes on a whole 256K sequence."""
    m = model_numbers(release, "fp8")
    assert kv_bytes_per_token(m, 2) == (2560, 5120)
    for n in (1, 129, 130, 8704, 262144):
        assert kv_bytes_for_length(m, n, 2).total == kv_bytes_for_sequence(release, n)
    kv = kv_bytes_for_length(m, 262144, 2)
    assert kv.full == 9 * 2560 * 262144 and kv.swa == 39 * 5120 * 129
    # 3 MTP drafts: 3 more SWA-shaped layers, and the window held 3 tokens longer
    assert kv_bytes_for_length(m, 8704, 2, num_mtp_drafts=3).swa == 42 * 5120 * 132


def test_release_weight_bytes_by_hand(release: MiMoConfig) -> None:
    """Catches a wrong FP8 rule (o_proj, embedding, lm_head and norms stay bf16, the router fp32)
    or expert memory counted at the wrong size."""
    m = model_numbers(release, "fp8")
    embedding = lm_head = 152576 * 4096
    o_proj = (48 + 3) * 64 * 128 * 4096
    norms = (2 * 48 + 1) * 4096 + 3 * 5 * 4096
    router = 47 * (256 * 4096 + 256)
    bf16 = embedding + lm_head + o_proj + norms
    dense = 309_766_601_088 - 47 * 256 * 3 * 4096 * 2048  # total params - routed experts
    assert m.dense_weight_bytes == (dense - bf16 - router) + 2 * bf16 + 4 * router == 10_080_929_408
    assert m.expert_weight_bytes == 3 * 4096 * 2048
    assert model_numbers(release, "bf16").dense_weight_bytes == 2 * dense


def test_kv_and_weight_arithmetic_equal_the_engine_on_the_tiny_model(one_thread: None) -> None:
    """Catches the capacity model pricing KV or weights differently from what the engine really
    allocates: two sequences (150 and 300 prompt tokens, window 64, blocks of 16) decode 20 tokens;
    after every step the blocks held in each pool, in bytes, equal kv_bytes_held's prediction, and
    the model's tensors hold exactly dense_weight_bytes + experts x expert_weight_bytes."""
    model = load_model(EMBEDDED_MODEL)
    m = model_numbers(model.config, "fp32")
    params = dict(model.named_parameters())
    expert_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if ".experts." in n)
    dense_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if ".experts." not in n)
    assert dense_bytes == m.dense_weight_bytes
    assert expert_bytes == m.num_moe_layers * m.num_experts * m.expert_weight_bytes

    block = 16
    engine = Engine(model, Tokenizer.from_dir(EMBEDDED_MODEL), EngineConfig(
        block_size=block, kv_cache_bytes=16 * 2**20, max_num_batched_tokens=1024, max_prefill_chunk=512,
        max_model_len=1024))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prompts = {"a": 150, "b": 300}
    for rid, n in prompts.items():
        ids = torch.randint(10, 4000, (n,), generator=gen).tolist()
        engine.add(GenerateRequest(rid, ids, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)))
    paged, layout = engine.runner.paged, engine.kv_cache.layout
    full_block, swa_block = (
        paged.full_kv.bytes // layout.num_full_blocks,
        paged.swa_kv.bytes // layout.num_swa_blocks,
    )
    assert (full_block, swa_block) == (block * 2 * m.kv_values_full * 4, block * 4 * m.kv_values_swa * 4)
    checked = 0
    for step in range(1, 20):  # after step 20 both finish and free everything
        engine.step()
        usage = engine.kv_cache.usage()
        computed, new = (0, None) if step == 1 else (step - 2, 1)
        predicted = [
            kv_bytes_held(m, computed + (n if step > 1 else 0), new or n, 4, block) for n in prompts.values()
        ]
        assert usage["full"].num_used * full_block == sum(p.full for p in predicted)
        assert usage["swa"].num_used * swa_block == sum(p.swa for p in predicted)
        checked += 1
    assert checked == 19


def test_h200_plan_meets_slos_and_is_minimal(release: MiMoConfig) -> None:
    """Catches a plan that breaks its own SLOs or memory, or that is not the cheapest: the same
    check with one attention replica or one expert shard fewer must fail."""
    m = model_numbers(release, "fp8", "MiMo-V2-Flash")
    hw, traffic = load_hardware(PROFILES / "h200.yaml"), load_traffic(PROFILES / "chat.yaml")
    p = plan(m, hw, traffic)
    assert hw.usable_bytes == int(141 * GB * 0.9) - 4 * GB
    assert p.attention_gpu_kv_budget_bytes == hw.usable_bytes - 10_080_929_408
    # mean 7,577.6 in + 1,126.4 out = 8,704 tokens; 3 MTP drafts add 3 SWA-shaped layers
    assert p.kv_bytes_per_sequence == 9 * 2560 * 8704 + 42 * 5120 * 132
    assert p.max_sequences_by_kv == p.attention_gpu_kv_budget_bytes // p.kv_bytes_per_sequence
    assert p.batch_per_replica <= p.max_sequences_by_kv
    assert p.expert_gpu_weight_bytes == p.experts_per_shard * 25_165_824 <= hw.usable_bytes
    assert p.experts_per_shard * p.expert_shards == 47 * (256 + p.redundant_experts_per_layer)
    assert p.itl_s <= traffic.itl_slo_s and p.ttft_p90_s <= traffic.ttft_slo_s
    assert p.gpus == p.attention_replicas + p.expert_shards
    assert _check(m, hw, traffic, p.attention_replicas - 1, p.expert_shards)[0] is None
    assert _check(m, hw, traffic, p.attention_replicas, p.expert_shards - 1)[0] is None
    assert len(p.reasoning) == 8


def test_mimo_plan_cli_json_chart_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches the subcommand not wired, a chart that is not a PNG, and a bad profile ending in a
    traceback instead of exit status 2 with the missing field named."""
    chart = tmp_path / "cost.png"
    args = ["plan", "--model", str(RELEASE), "--traffic", str(PROFILES / "chat.yaml"),
            "--hardware", str(PROFILES / "h200.yaml")]  # fmt: skip
    assert main([*args, "--json", "--chart", str(chart)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == out["attention_replicas"] + out["expert_shards"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("qps: 3\n")
    assert main(["plan", "--traffic", str(bad), "--hardware", str(PROFILES / "h200.yaml")]) == 2
    assert "missing field 'input_tokens'" in capsys.readouterr().err
