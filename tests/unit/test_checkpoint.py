"""Checkpoint reader/writer on tiny hub-layout checkpoints: sharding, FP8 sidecars, and every error path."""

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import mimo.checkpoint as checkpoint
from mimo.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    CheckpointReader,
    is_quantized_layer,
    release_shard_name,
    validate_names_and_shapes,
    write_checkpoint,
)
from mimo.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks

BLOCK = [4, 4]  # small blocks so the tiny weights have several blocks and ragged edges
QUANT = {
    "quant_method": "fp8",
    "weight_block_size": BLOCK,
    "ignored_layers": ["model.layers.0.self_attn.o_proj"],
}


def _tiny_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(dtype)

    tensors = {
        "model.embed_tokens.weight": randn(16, 8),
        "model.layers.0.input_layernorm.weight": randn(8),
        "model.layers.0.self_attn.q_proj.weight": randn(12, 8),
        "model.layers.0.self_attn.o_proj.weight": randn(8, 12),
        "model.layers.0.self_attn.attention_sink_bias": randn(4),
        "model.layers.0.mlp.gate_proj.weight": randn(10, 8),
        "model.layers.1.mlp.gate.weight": randn(4, 8, dtype=torch.float32),
        "model.layers.1.mlp.gate.e_score_correction_bias": randn(4, dtype=torch.float32),
        "model.mtp.layers.0.enorm.weight": randn(8),
        "model.mtp.layers.0.self_attn.q_proj.weight": randn(12, 8),
        "model.norm.weight": randn(8),
        "lm_head.weight": randn(16, 8),
    }
    for expert in range(2):
        for proj, shape in (("gate_proj", (6, 8)), ("up_proj", (6, 8)), ("down_proj", (8, 6))):
            tensors[f"model.layers.1.mlp.experts.{expert}.{proj}.weight"] = randn(*shape)
    return tensors


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _tiny_state_dict()
    write_checkpoint(tmp_path / "ckpt", tensors, quantization_config=QUANT)
    return tmp_path / "ckpt", tensors


def test_release_shard_name_matches_release_layout() -> None:
    """Catches expert projections landing in the per-layer file (or fc1/fc2 swapped), which breaks subsets."""
    assert release_shard_name("model.embed_tokens.weight") == "model_embedding.safetensors"
    assert release_shard_name("model.norm.weight") == "model_final.safetensors"
    assert release_shard_name("lm_head.weight") == "model_final.safetensors"
    assert release_shard_name("model.mtp.layers.0.eh_proj.weight") == "model_mtp.safetensors"
    assert (
        release_shard_name("model.layers.7.mlp.experts.255.gate_proj.weight")
        == "model_7_linear_fc1.safetensors"
    )
    assert release_shard_name("model.layers.7.mlp.experts.3.up_proj.weight_scale_inv") == (
        "model_7_linear_fc1.safetensors"
    )
    assert (
        release_shard_name("model.layers.7.mlp.experts.3.down_proj.weight")
        == "model_7_linear_fc2.safetensors"
    )
    assert release_shard_name("model.layers.12.mlp.gate.weight") == "model_12.safetensors"
    assert release_shard_name("model.layers.0.mlp.down_proj.weight") == "model_0.safetensors"
    with pytest.raises(CheckpointError, match=r"vision\.proj\.weight"):
        release_shard_name("vision.proj.weight")


def test_is_quantized_layer_follows_hub_rules() -> None:
    """Catches quantizing a router, norm, embedding or an ignored o_proj (the release keeps those bf16)."""
    quantized = [
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",  # only layer 0's o_proj is ignored in QUANT
        "model.layers.3.mlp.experts.5.gate_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.mtp.layers.0.eh_proj.weight",
    ]
    kept = [
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.3.mlp.gate.weight",
        "model.layers.3.mlp.gate.e_score_correction_bias",
        "model.layers.3.self_attn.attention_sink_bias",
        "model.layers.3.input_layernorm.weight",
        "model.mtp.layers.0.hnorm.weight",
        "model.norm.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ]
    assert [name for name in quantized + kept if is_quantized_layer(name, QUANT)] == quantized
    assert not is_quantized_layer("model.layers.3.self_attn.q_proj.weight", None)


def test_writer_shards_index_and_fp8_sidecars(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Catches sidecars written apart from their weight, a wrong total_size, or FP8 on an ignored layer."""
    path, tensors = tiny
    index = json.loads((path / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    assert sorted(p.name for p in path.glob("*.safetensors")) == sorted(set(weight_map.values()))
    assert sorted(set(weight_map.values())) == [
        "model_0.safetensors",
        "model_1.safetensors",
        "model_1_linear_fc1.safetensors",
        "model_1_linear_fc2.safetensors",
        "model_embedding.safetensors",
        "model_final.safetensors",
        "model_mtp.safetensors",
    ]
    sidecars = sorted(name for name in weight_map if name.endswith("_scale_inv"))
    assert sidecars == sorted(
        f"{name}_scale_inv"
        for name in tensors
        if is_quantized_layer(name, QUANT) and tensors[name].dim() == 2
    )
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" not in weight_map
    assert (
        weight_map["model.layers.1.mlp.experts.1.down_proj.weight_scale_inv"]
        == "model_1_linear_fc2.safetensors"
    )
    # total_size counts stored bytes: 1 byte per FP8 element plus 4 per scale, 2 per bf16, 4 per fp32.
    expected_bytes = 0
    for name, tensor in tensors.items():
        if f"{name}_scale_inv" in weight_map:
            rows, cols = tensor.shape
            expected_bytes += tensor.numel() + 4 * (-(-rows // BLOCK[0])) * (-(-cols // BLOCK[1]))
        else:
            expected_bytes += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == expected_bytes


def test_names_hide_sidecars_and_report_logical_shape_and_stored_dtype(
    tiny: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """Catches sidecars leaking into names() or an FP8 weight reporting its scale grid's shape."""
    path, tensors = tiny
    reader = CheckpointReader(path, QUANT)
    assert reader.names() == sorted(tensors)
    assert reader.shape("model.layers.0.self_attn.q_proj.weight") == (12, 8)
    assert reader.dtype("model.layers.0.self_attn.q_proj.weight") == torch.float8_e4m3fn
    assert reader.dtype("model.layers.0.self_attn.o_proj.weight") == torch.bfloat16
    assert reader.dtype("model.layers.1.mlp.gate.weight") == torch.float32
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_scale_inv"):
        reader.shape("model.layers.0.self_attn.q_proj.weight_scale_inv")


def test_fp8_round_trip_dequantizes_and_keeps_ignored_layers_exact(
    tiny: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """Catches a wrong block size or sidecar pairing on load, and ignored o_proj being quantized anyway."""
    path, tensors = tiny
    loaded = CheckpointReader(path, QUANT).load(tensors, progress=False)
    assert list(loaded) == list(tensors)
    for name, original in tensors.items():
        if is_quantized_layer(name, QUANT):
            assert loaded[name].dtype == torch.float32
            # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the element, plus subnormal slack.
            bound = original.float().abs() * 2**-4 + 1e-5
            assert ((loaded[name] - original.float()).abs() <= bound).all(), name
        else:
            assert loaded[name].dtype == original.dtype, name
            assert torch.equal(loaded[name], original), name
    as_bf16 = CheckpointReader(path, QUANT).load(
        ["model.layers.0.self_attn.q_proj.weight"], dtype=torch.bfloat16
    )
    assert torch.equal(
        as_bf16["model.layers.0.self_attn.q_proj.weight"],
        loaded["model.layers.0.self_attn.q_proj.weight"].bfloat16(),
    )


def test_load_subset_opens_only_needed_shards_once(
    tiny: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a loader that scans every shard (an expert shard would read the whole 300 GB model)."""
    path, _ = tiny
    opened: list[str] = []
    real_safe_open = checkpoint.safe_open

    def recording_safe_open(file: str, **kwargs: Any) -> Any:
        opened.append(Path(file).name)
        return real_safe_open(file, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", recording_safe_open)
    names = [
        f"model.layers.1.mlp.experts.{e}.{p}.weight"
        for e in range(2)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    loaded = CheckpointReader(path, QUANT).load(names, progress=False)
    assert sorted(loaded) == sorted(names)
    assert sorted(opened) == ["model_1_linear_fc1.safetensors", "model_1_linear_fc2.safetensors"]


def test_sidecar_in_another_shard_still_pairs(tmp_path: Path) -> None:
    """Catches dequantizing only when weight and scale share a shard (the index allows them apart)."""
    q, scale_inv = quantize_fp8_blocks(torch.randn(6, 5), (4, 4))
    save_file({"a.weight": q}, str(tmp_path / "weights.safetensors"))
    save_file({"a.weight_scale_inv": scale_inv}, str(tmp_path / "scales.safetensors"))
    weight_map = {"a.weight": "weights.safetensors", "a.weight_scale_inv": "scales.safetensors"}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    reader = CheckpointReader(tmp_path, {"weight_block_size": [4, 4]})
    assert reader.names() == ["a.weight"]
    loaded = reader.load(["a.weight"], progress=False)
    assert torch.equal(loaded["a.weight"], dequantize_fp8_blocks(q, scale_inv, (4, 4)))


def test_load_fp8_keeps_weights_as_stored(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Catches FP8 weights dequantized (or scales dropped) on the path that keeps them FP8, or a
    bf16 tensor passed off as FP8."""
    path, tensors = tiny
    name = "model.layers.1.mlp.experts.1.down_proj.weight"
    reader = CheckpointReader(path, QUANT)
    ((q, scale_inv),) = reader.load_fp8([name]).values()
    expected_q, expected_scale = quantize_fp8_blocks(tensors[name], (4, 4))
    assert q.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))
    assert torch.equal(scale_inv, expected_scale)
    assert torch.equal(dequantize_fp8_blocks(q, scale_inv, (4, 4)), reader.load([name], progress=False)[name])
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is stored as torch\.bfloat16, not FP8"):
        reader.load_fp8(["model.norm.weight"])


def test_fp8_nan_is_refused_by_both_loads(tmp_path: Path) -> None:
    """Catches a NaN FP8 weight loaded as a number (the fast conversion reads NaN codes as 480)."""
    q, scale_inv = quantize_fp8_blocks(torch.randn(6, 5), (4, 4))
    q.view(torch.uint8)[2, 3] = 0xFF
    save_file({"a.weight": q, "a.weight_scale_inv": scale_inv}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path, {"weight_block_size": [4, 4]})
    with pytest.raises(CheckpointError, match=r"FP8 tensor a\.weight holds NaN"):
        reader.load(["a.weight"], progress=False)
    with pytest.raises(CheckpointError, match=r"FP8 tensor a\.weight holds NaN"):
        reader.load_fp8(["a.weight"])


def test_missing_shard_file_names_file_and_a_tensor(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Catches a partial download surfacing later as a confusing KeyError deep inside loading."""
    path, _ = tiny
    (path / "model_1_linear_fc2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model_1_linear_fc2\.safetensors is missing .*down_proj"):
        CheckpointReader(path, QUANT)


def test_truncated_shard_names_the_file(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Catches a truncated download read as garbage (or a raw SafetensorError with no file name)."""
    path, _ = tiny
    shard = path / "model_0.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    reader = CheckpointReader(path, QUANT)
    assert reader.shape("model.embed_tokens.weight") == (16, 8)  # other shards stay usable
    with pytest.raises(CheckpointError, match=r"model_0\.safetensors: truncated"):
        reader.load(["model.layers.0.input_layernorm.weight"], progress=False)


def test_bad_header_names_the_file(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Catches a corrupt header length or JSON crashing with a bare struct/JSON error."""
    path, _ = tiny
    shard = path / "model_final.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(CheckpointError, match=r"model_final\.safetensors: header of"):
        CheckpointReader(path, QUANT).shape("lm_head.weight")
    shard.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=r"model_final\.safetensors: bad header"):
        CheckpointReader(path, QUANT).shape("lm_head.weight")


def test_safetensors_error_is_wrapped_with_the_file(tmp_path: Path) -> None:
    """Catches safetensors' own validation errors (offsets vs shape) escaping without the shard's name."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    reader = CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as caught:
        reader.load(["x"], progress=False)
    assert isinstance(caught.value.__cause__, SafetensorError)


def test_fp8_without_sidecar_names_the_tensor(tmp_path: Path) -> None:
    """Catches FP8 codes returned as if they were weights when the scale sidecar is absent."""
    save_file({"w.weight": torch.ones(4, 4).to(torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert reader.names() == ["w.weight"]
    with pytest.raises(
        CheckpointError, match=r"FP8 tensor w\.weight has no scale sidecar w\.weight_scale_inv"
    ):
        reader.load(["w.weight"], progress=False)


def test_wrong_block_size_names_the_tensor(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Catches quantization_config's weight_block_size being ignored on load (a silent mis-scaling)."""
    path, _ = tiny
    reader = CheckpointReader(path, {"quant_method": "fp8", "weight_block_size": [8, 8]})
    with pytest.raises(CheckpointError, match=r"q_proj\.weight: .*expected \(2, 1\), got \(3, 2\)"):
        reader.load(["model.layers.0.self_attn.q_proj.weight"], progress=False)


def test_absent_requested_names_are_listed_with_count(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Catches a typo'd tensor name silently returning fewer tensors than asked for."""
    path, _ = tiny
    reader = CheckpointReader(path, QUANT)
    with pytest.raises(
        CheckpointError, match=r"1 requested tensor\(s\) not in .*: model\.layers\.9\.x\.weight$"
    ):
        reader.load(["model.norm.weight", "model.layers.9.x.weight"], progress=False)
    absent = [f"nope.{i}" for i in range(11)]
    with pytest.raises(CheckpointError, match=r"11 requested .*nope\.0, .*nope\.7 and 3 more$"):
        reader.load(absent, progress=False)


def test_validate_names_and_shapes_reports_each_kind(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Catches a model/checkpoint mismatch reported without the offending tensors' names and shapes."""
    path, tensors = tiny
    reader = CheckpointReader(path, QUANT)
    expected = {name: tuple(t.shape) for name, t in tensors.items()}
    validate_names_and_shapes(reader, expected)  # FP8 weights compare by their logical shape

    expected.pop("lm_head.weight")
    expected["model.layers.2.self_attn.q_proj.weight"] = (12, 8)
    expected["model.layers.0.self_attn.q_proj.weight"] = (8, 12)
    with pytest.raises(CheckpointError) as caught:
        validate_names_and_shapes(reader, expected)
    message = str(caught.value)
    assert "1 missing: model.layers.2.self_attn.q_proj.weight" in message
    assert "1 unexpected: lm_head.weight" in message
    assert "1 mis-shaped: model.layers.0.self_attn.q_proj.weight (expected (8, 12), found (12, 8))" in message

    expected["lm_head.weight"] = (16, 8)
    expected.pop("model.mtp.layers.0.enorm.weight")
    expected.pop("model.layers.2.self_attn.q_proj.weight")
    expected["model.layers.0.self_attn.q_proj.weight"] = (12, 8)
    validate_names_and_shapes(reader, expected, allow_unexpected=lambda name: name.startswith("model.mtp."))


def test_single_file_checkpoint_without_index(tmp_path: Path) -> None:
    """Catches the reader insisting on an index, which small hub models do not ship."""
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1, 2])}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert reader.names() == ["a", "b"]
    assert reader.shape("b") == (2, 3) and reader.dtype("a") == torch.int64
    loaded = reader.load(["b", "a"], dtype=torch.bfloat16, progress=False)
    assert list(loaded) == ["b", "a"]
    assert loaded["b"].dtype == torch.bfloat16 and loaded["a"].dtype == torch.int64  # ints are not cast
    assert loaded["b"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_directory_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    """Catches an empty or wrong directory being read as an empty checkpoint."""
    with pytest.raises(
        CheckpointError, match=r"neither model\.safetensors\.index\.json nor model\.safetensors"
    ):
        CheckpointReader(tmp_path)


def test_index_pointing_at_wrong_shard_names_both(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Catches an inconsistent index surfacing as a bare safetensors KeyError."""
    path, _ = tiny
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "model_embedding.safetensors"
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight in model_embedding\.safetensors"):
        CheckpointReader(path, QUANT).load(["model.norm.weight"], progress=False)
