"""Model-agnostic reading and writing of hub-format safetensors checkpoints.

The reader indexes a sharded (or single-file) checkpoint from file headers alone, then loads any subset
of tensors opening each needed shard once, so an expert shard touches only its own files; FP8 weights
are dequantized with their `weight_scale_inv` sidecar on the way, or kept as stored (`load_fp8`).
The writer produces the release's layout (shard names, FP8 + sidecar, index with total_size) so
tests and tools build real checkpoints.
"""

import json
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mimo.fp8 import (
    DEFAULT_BLOCK,
    FP8_DTYPE,
    dequantize_fp8_blocks,
    has_fp8_nan,
    quantize_fp8_blocks,
    scale_shape,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # hub convention: the sidecar of `x.weight` is `x.weight_scale_inv`
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors refuses larger headers too
_PREVIEW_NAMES = 8
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Module leaves that are never FP8 in the hub format: norms, embeddings, lm_head, and the MoE router
# (`mlp.gate`, not `mlp.gate_proj`); biases such as `attention_sink_bias` fail the `.weight` test.
_NEVER_QUANTIZED_LEAF = re.compile(r"(\w*norm|embed_tokens|lm_head|gate)")
_EXPERT_PROJ = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_Loaded = TypeVar("_Loaded")  # what a load makes of each name's stored tensors


class CheckpointError(ValueError):
    """A checkpoint on disk is incomplete, corrupt, or does not match what the caller expects."""


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor as its shard header describes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]


class CheckpointReader:
    """Lazy view of a checkpoint directory; `names()` hides FP8 scale sidecars (part of their weight)."""

    def __init__(self, path: Path, quantization_config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.block = fp8_block_size(quantization_config)
        self._headers: dict[str, dict[str, TensorInfo]] = {}  # shard file name -> its header, on demand
        self._shard_of = self._read_weight_map()  # stored tensor name -> shard file name
        for shard in sorted(set(self._shard_of.values())):
            if not (self.path / shard).is_file():
                holds = next(name for name, s in self._shard_of.items() if s == shard)
                raise CheckpointError(f"shard file {self.path / shard} is missing (it should hold {holds})")
        self._names = sorted(name for name in self._shard_of if not self._is_sidecar(name))
        self._name_set = frozenset(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(self._logical(name)).shape

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype: float8_e4m3fn for FP8 weights, which `load` dequantizes."""
        return self._info(self._logical(name)).dtype

    def load(
        self,
        names: Iterable[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        desc: str = "loading",
    ) -> dict[str, torch.Tensor]:
        """Load `names` (FP8 dequantized; floating tensors cast to `dtype` when given), in request order."""
        return self._load_parts(names, device, progress, desc, lambda name, t: self._finish(name, t, dtype))

    def load_fp8(
        self, names: Iterable[str], device: str | torch.device = "cpu"
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Load FP8 weights as stored, nothing dequantized: name -> (float8_e4m3fn [out, in], fp32
        scale_inv [ceil(out/bo), ceil(in/bi)]). Every name must be stored as FP8."""
        return self._load_parts(names, device, False, "loading", self._stored_fp8)

    def _load_parts(
        self,
        names: Iterable[str],
        device: str | torch.device,
        progress: bool,
        desc: str,
        finish: Callable[[str, list[torch.Tensor]], _Loaded],
    ) -> dict[str, _Loaded]:
        """Reads each name's stored tensors (an FP8 weight and its sidecar) and hands them to `finish`
        as soon as all have been read, opening each shard once."""
        wanted = list(dict.fromkeys(names))
        absent = [name for name in wanted if name not in self._name_set]
        if absent:
            raise CheckpointError(f"{len(absent)} requested tensor(s) not in {self.path}: {_preview(absent)}")
        parts: dict[str, list[str]] = {}  # logical name -> stored names it is built from
        owner: dict[str, str] = {}  # stored name -> logical name
        for name in wanted:
            parts[name] = [name]
            if self._info(name).dtype == FP8_DTYPE:
                sidecar = name + SCALE_SUFFIX
                if sidecar not in self._shard_of:
                    raise CheckpointError(f"FP8 tensor {name} has no scale sidecar {sidecar}")
                parts[name].append(sidecar)
            owner.update((stored, name) for stored in parts[name])
        by_shard: dict[str, list[str]] = {}
        for stored in owner:
            by_shard.setdefault(self._shard_of[stored], []).append(stored)

        loaded: dict[str, _Loaded] = {}
        stored_pending: dict[str, torch.Tensor] = {}  # a weight whose sidecar sits in a later shard
        shards = tqdm(sorted(by_shard), desc=desc, unit="shard", disable=None if progress else True)
        for shard in shards:
            stored_pending.update(self._read_shard(shard, by_shard[shard], device))
            for name in dict.fromkeys(owner[stored] for stored in by_shard[shard]):
                if all(stored in stored_pending for stored in parts[name]):
                    tensors = [stored_pending.pop(stored) for stored in parts[name]]
                    loaded[name] = finish(name, tensors)
        assert not stored_pending, "every stored tensor belongs to a finished logical tensor"
        return {name: loaded[name] for name in wanted}

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"unreadable checkpoint index {index_path}: {err!r}") from err
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard files")
            return dict(weight_map)
        if (self.path / SINGLE_FILE).is_file():
            header = self._header(SINGLE_FILE)
            return dict.fromkeys(header, SINGLE_FILE)
        raise CheckpointError(f"{self.path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")

    def _is_sidecar(self, name: str) -> bool:
        return name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in self._shard_of

    def _logical(self, name: str) -> str:
        if name not in self._name_set:
            raise CheckpointError(f"no tensor {name} in {self.path}")
        return name

    def _header(self, shard: str) -> dict[str, TensorInfo]:
        if shard not in self._headers:
            self._headers[shard] = _read_header(self.path / shard)
        return self._headers[shard]

    def _info(self, stored: str) -> TensorInfo:
        shard = self._shard_of[stored]
        header = self._header(shard)
        if stored not in header:
            raise CheckpointError(f"{INDEX_FILE} puts {stored} in {shard}, but that shard does not hold it")
        return header[stored]

    def _read_shard(
        self, shard: str, stored_names: list[str], device: str | torch.device
    ) -> dict[str, torch.Tensor]:
        for stored in stored_names:
            self._info(stored)  # a name the index misplaces fails here with the shard's name
        file = self.path / shard
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                return {stored: f.get_tensor(stored) for stored in stored_names}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"corrupt or unreadable shard {file}: {err}") from err

    def _stored_fp8(self, name: str, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(tensors) != 2:
            raise CheckpointError(f"{name} is stored as {tensors[0].dtype}, not FP8")
        q, scale_inv = tensors
        _check_no_nan(name, q)
        try:
            expected = scale_shape(tuple(q.shape), self.block)
        except ValueError as err:
            raise CheckpointError(f"{name}: {err}") from err
        if tuple(scale_inv.shape) != expected:
            raise CheckpointError(
                f"{name}: scale_inv shape {tuple(scale_inv.shape)} does not fit block {self.block}: "
                f"expected {expected}"
            )
        return q, scale_inv.float()

    def _finish(self, name: str, tensors: list[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
        if len(tensors) == 2:
            q, scale_inv = tensors
            _check_no_nan(name, q)
            try:
                return dequantize_fp8_blocks(q, scale_inv, self.block, dtype or torch.float32)
            except ValueError as err:
                raise CheckpointError(f"{name}: {err}") from err
        (tensor,) = tensors
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _check_no_nan(name: str, q: torch.Tensor) -> None:
    # dequantize_fp8_blocks reads the NaN codes as numbers (its fast conversion): refuse them here
    if has_fp8_nan(q):
        raise CheckpointError(f"FP8 tensor {name} holds NaN")


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a shard's header (8-byte little-endian length + JSON) and check the file holds its data."""
    try:
        file_bytes = file.stat().st_size
        with file.open("rb") as f:
            length_field = f.read(8)
            if len(length_field) < 8:
                raise CheckpointError(f"corrupt shard {file}: {file_bytes} bytes, no header length")
            (header_bytes,) = struct.unpack("<Q", length_field)
            if header_bytes > min(_MAX_HEADER_BYTES, file_bytes - 8):
                raise CheckpointError(f"corrupt shard {file}: header of {header_bytes} bytes in {file_bytes}")
            raw = json.loads(f.read(header_bytes))
        infos: dict[str, TensorInfo] = {}
        data_end = 0
        for name, entry in raw.items():
            if name == "__metadata__":
                continue
            infos[name] = TensorInfo(
                _SAFETENSORS_DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
            )
            data_end = max(data_end, int(entry["data_offsets"][1]))
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"corrupt or unreadable shard {file}: bad header ({err!r})") from err
    if 8 + header_bytes + data_end > file_bytes:
        raise CheckpointError(
            f"corrupt shard {file}: truncated, {file_bytes} of {8 + header_bytes + data_end} bytes"
        )
    return infos


def validate_names_and_shapes(
    reader: CheckpointReader,
    expected: Mapping[str, tuple[int, ...]],
    *,
    allow_unexpected: Callable[[str], bool] | None = None,
) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped tensors (logical shapes)."""
    found = set(reader.names())
    missing = sorted(set(expected) - found)
    unexpected = sorted(
        name for name in found - set(expected) if allow_unexpected is None or not allow_unexpected(name)
    )
    misshaped = [
        f"{name} (expected {tuple(expected[name])}, found {reader.shape(name)})"
        for name in sorted(found & set(expected))
        if reader.shape(name) != tuple(expected[name])
    ]
    problems = [
        f"{len(names)} {kind}: {_preview(names)}"
        for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if names
    ]
    if problems:
        raise CheckpointError(f"checkpoint {reader.path} does not match the model: " + "; ".join(problems))


def fp8_block_size(quantization_config: Mapping[str, Any] | None) -> tuple[int, int]:
    """The (block_out, block_in) of an FP8 `quantization_config`; the hub default when absent."""
    if quantization_config is None:
        return DEFAULT_BLOCK
    method = quantization_config.get("quant_method", "fp8")
    if method != "fp8":
        raise CheckpointError(f"quantization_config.quant_method is {method!r}; only 'fp8' is supported")
    block = quantization_config.get("weight_block_size", DEFAULT_BLOCK)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(
            f"quantization_config.weight_block_size must be two positive ints, got {block!r}"
        )
    return (block[0], block[1])


def is_quantized_layer(name: str, quantization_config: Mapping[str, Any] | None) -> bool:
    """Whether the hub format stores tensor `name` as FP8 under `quantization_config` (by name alone)."""
    if quantization_config is None or not name.endswith(".weight"):
        return False
    module = name.removesuffix(".weight")
    if module in quantization_config.get("ignored_layers", ()):
        return False
    return _NEVER_QUANTIZED_LEAF.fullmatch(module.rsplit(".", 1)[-1]) is None


def release_shard_name(name: str) -> str:
    """The shard file the released MiMo-V2-Flash checkpoint keeps tensor `name` in."""
    if name.startswith("model.embed_tokens."):
        return "model_embedding.safetensors"
    if name.startswith(("model.norm.", "lm_head.")):
        return "model_final.safetensors"
    if name.startswith("model.mtp."):
        return "model_mtp.safetensors"
    if expert := _EXPERT_PROJ.match(name):
        fc = "fc2" if expert[2] == "down_proj" else "fc1"
        return f"model_{expert[1]}_linear_{fc}.safetensors"
    if layer := _LAYER.match(name):
        return f"model_{layer[1]}.safetensors"
    raise CheckpointError(f"{name} has no shard in the release layout; pass shard_for")


def write_checkpoint(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    shard_for: Callable[[str], str] = release_shard_name,
    quantization_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write safetensors shards + index; 2-D quantized layers become FP8 + `weight_scale_inv`.

    `dtype` casts the floating tensors that stay unquantized (e.g. bf16 for a release-like file).
    """
    block = fp8_block_size(quantization_config)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        shard = shards.setdefault(shard_for(name), {})
        tensor = tensor.detach().cpu()
        if tensor.dim() == 2 and is_quantized_layer(name, quantization_config):
            if name + SCALE_SUFFIX in tensors:
                raise CheckpointError(
                    f"{name + SCALE_SUFFIX} is given and would also be written by quantizing"
                )
            shard[name], shard[name + SCALE_SUFFIX] = quantize_fp8_blocks(tensor, block)
        elif dtype is not None and tensor.is_floating_point():
            shard[name] = tensor.to(dtype).contiguous()
        else:
            shard[name] = tensor.contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for shard_name, shard_tensors in sorted(shards.items()):
        save_file(shard_tensors, str(path / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_tensors, shard_name))
        total_bytes += sum(t.numel() * t.element_size() for t in shard_tensors.values())
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:_PREVIEW_NAMES])
    more = len(names) - _PREVIEW_NAMES
    return f"{shown} and {more} more" if more > 0 else shown
