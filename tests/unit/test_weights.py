"""Loading models from hub checkpoints: subsets, expert shards, FP8, meta construction, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mimo.checkpoint import CheckpointError
from mimo.config import MiMoConfig
from mimo.fp8 import dequantize_fp8_blocks
from mimo.model import MiMoForCausalLM
from mimo.moe import Experts
from mimo.weights import hub_shapes, load_model, load_tensors, select_names, stack_experts
from tests.factory import random_config_dict, write_random_checkpoint
from tests.unit.test_config import released

FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [32, 32],
    "ignored_layers": [f"model.layers.{i}.self_attn.o_proj" for i in range(7)],
}


def test_released_config_builds_on_meta() -> None:
    """Catches construction that allocates real memory (309B params would not fit anywhere here)."""
    config = MiMoConfig.from_hub_dict(released())
    with torch.device("meta"):
        model = MiMoForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 309_766_601_088
    assert all(p.is_meta for p in model.parameters())


def test_loaded_model_equals_written(tmp_path: Path) -> None:
    """Catches experts stacked in the wrong order or a parameter left unloaded."""
    written = write_random_checkpoint(tmp_path, random_config_dict())
    loaded = load_model(tmp_path)
    for (name, a), (_, b) in zip(written.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_expert_subsets_sum_to_full_layer(tmp_path: Path) -> None:
    """Catches shards' partial outputs not adding up to the whole MoE layer (the dispatch contract)."""
    model = write_random_checkpoint(tmp_path, random_config_dict())
    config = model.config
    from mimo.checkpoint import CheckpointReader

    reader = CheckpointReader(tmp_path)
    layer = 3
    x = torch.randn(10, config.hidden_size)
    moe = model.model.layers[layer].mlp
    routing = moe.gate(x)
    total = torch.zeros_like(x)
    for ids in ([0, 5, 9, 15, 2], [1, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14]):
        names = select_names(config, dense=False, experts=[(layer, e) for e in ids])
        state = stack_experts(config, load_tensors(reader, names, torch.float32, "cpu", progress=False))
        shard = Experts(config, expert_ids=sorted(ids))
        shard.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in state.items()})
        total += shard(x, routing)
    torch.testing.assert_close(total, moe.experts(x, routing), rtol=0, atol=1e-5)


def test_dense_only_load_skips_expert_bytes(tmp_path: Path) -> None:
    """Catches the attention replica reading expert weights it never uses."""
    write_random_checkpoint(tmp_path, random_config_dict())
    model = load_model(tmp_path, experts="none", mtp=False)
    assert all(p.is_meta for n, p in model.named_parameters() if ".experts." in n or ".mtp." in n)
    assert not any(
        p.is_meta for n, p in model.named_parameters() if ".experts." not in n and ".mtp." not in n
    )


def test_fp8_checkpoint_matches_dequantized_reference(tmp_path: Path) -> None:
    """Catches FP8 block dequant errors on ragged shapes (dims not multiples of the 32x32 block) and
    ignored_layers (o_proj) being quantized or mis-read."""
    cfg = random_config_dict(moe_intermediate_size=40, intermediate_size=72)
    write_random_checkpoint(tmp_path, cfg, quantization_config=FP8_CONFIG)
    model = load_model(tmp_path)
    expected: dict[str, torch.Tensor] = {}
    num_fp8 = 0
    for shard in sorted(tmp_path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith("_scale_inv"):
                    continue
                t = f.get_tensor(key)
                if t.dtype == torch.float8_e4m3fn:
                    num_fp8 += 1
                    t = dequantize_fp8_blocks(t, f.get_tensor(key + "_scale_inv"), (32, 32))
                    assert ".o_proj." not in key or ".mtp." in key
                expected[key] = t.float()
    assert num_fp8 > 0
    config = MiMoConfig.from_hub_dict({**cfg, "quantization_config": FP8_CONFIG})
    reference = MiMoForCausalLM(config)
    reference.load_state_dict(stack_experts(config, expected))
    for (name, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]])
    with torch.no_grad():
        ours = model.logits(model.forward_hidden(ids, torch.arange(11)))
        ref = reference.logits(reference.forward_hidden(ids, torch.arange(11)))
    assert torch.equal(ours, ref)


def test_wrong_shape_names_tensor(tmp_path: Path) -> None:
    """Catches a checkpoint whose config disagrees with its tensors loading as garbage."""
    cfg = random_config_dict()
    write_random_checkpoint(tmp_path, cfg)
    (tmp_path / "config.json").write_text(
        (tmp_path / "config.json").read_text().replace('"v_head_dim": 32', '"v_head_dim": 16')
    )
    with pytest.raises(CheckpointError, match=r"v_proj\.weight"):
        load_model(tmp_path)


def test_missing_and_corrupt_shards_name_the_file(tmp_path: Path) -> None:
    """Catches a missing or truncated shard surfacing as an unexplained crash."""
    write_random_checkpoint(tmp_path, random_config_dict())
    shard = tmp_path / "model_3_linear_fc1.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model_3_linear_fc1\.safetensors"):
        load_model(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"model_3_linear_fc1\.safetensors"):
        load_model(tmp_path)


def test_hub_shapes_match_release_names() -> None:
    """Catches a tensor name diverging from the hub layout in MODEL.md."""
    shapes = hub_shapes(MiMoConfig.from_hub_dict(released()))
    assert shapes["model.layers.1.self_attn.attention_sink_bias"] == (64,)
    assert "model.layers.0.self_attn.attention_sink_bias" not in shapes
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (4096, 8192)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (8 * 192, 4096)
    assert shapes["model.layers.5.self_attn.v_proj.weight"] == (4 * 128, 4096)
    assert shapes["model.layers.47.mlp.gate.weight"] == (256, 4096)
    assert shapes["model.layers.47.mlp.gate.e_score_correction_bias"] == (256,)
    assert shapes["model.layers.47.mlp.experts.255.down_proj.weight"] == (4096, 2048)
    assert shapes["model.mtp.layers.2.eh_proj.weight"] == (4096, 8192)
    assert shapes["model.mtp.layers.0.self_attn.attention_sink_bias"] == (64,)
    assert shapes["model.mtp.layers.1.mlp.gate_proj.weight"] == (16384, 4096)
    assert len([n for n in shapes if ".experts." in n]) == 47 * 256 * 3
