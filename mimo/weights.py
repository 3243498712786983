"""Hub tensor names <-> model parameters, and loading a model (or only part of it) from a checkpoint.

The hub stores one tensor per expert (`model.layers.N.mlp.experts.E.gate_proj.weight`); the model
stacks a layer's experts into one [E, I, H] parameter. Everything else has the same name on both
sides. Callers choose what to load: the dense part, all experts, or given (layer, expert) pairs,
so an expert shard reads only its own bytes from the memory-mapped files. A checkpoint that stores no
MTP tensor at all (transformers saves none) is served without MTP blocks, with one warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from mimo.checkpoint import CheckpointReader, validate_names_and_shapes
from mimo.config import MiMoConfig
from mimo.model import MiMoForCausalLM, cast_model
from mimo.moe import Experts

logger = logging.getLogger(__name__)

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
MTP_PREFIX = "model.mtp."
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def expert_tensor_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def parse_expert_name(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, proj) for a hub expert tensor name, else None."""
    m = _EXPERT_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def hub_shapes(config: MiMoConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a complete hub checkpoint with its logical shape."""
    with torch.device("meta"):
        model = MiMoForCausalLM(config)
    h, inter = config.hidden_size, config.moe_intermediate_size
    per_proj = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            if name.endswith("gate_up_proj"):
                layer = int(name.split(".")[2])
                for e in range(config.num_experts):
                    for proj, shape in per_proj.items():
                        shapes[expert_tensor_name(layer, e, proj)] = shape
        else:
            shapes[name] = tuple(param.shape)
    return shapes


def without_absent_mtp(config: MiMoConfig, stored_names: Iterable[str]) -> MiMoConfig:
    """`config`, or `config` with no MTP blocks when the checkpoint stores no `model.mtp.*` tensor at
    all: transformers drops them on save, and a config without `num_nextn_predict_layers` still
    declares the release's 3. A checkpoint holding only some of them keeps its blocks (and then
    fails validation naming the missing ones): a corrupt checkpoint is never accepted silently."""
    if config.num_mtp_layers == 0 or any(name.startswith(MTP_PREFIX) for name in stored_names):
        return config
    return replace(config, num_mtp_layers=0)


def checkpoint_config(path: str | Path) -> MiMoConfig:
    """The config a checkpoint is served with: its config.json, less the MTP blocks when it stores
    none of their tensors. Reads config.json and the safetensors index (or header), never weights."""
    config = MiMoConfig.from_file(path)
    reader = CheckpointReader(Path(path), quantization_config=quantization_dict(config))
    return without_absent_mtp(config, reader.names())


def is_fp32_tensor(name: str) -> bool:
    """Router weight and correction bias stay fp32 whatever the model dtype."""
    return name.endswith(_FP32_SUFFIXES)


def hub_state_from_model(model: MiMoForCausalLM) -> dict[str, torch.Tensor]:
    """The model's parameters under hub names (experts unstacked, gate/up split), e.g. to save."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():
        if ".mlp.experts." not in name:
            out[name] = param
            continue
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(module, Experts)
        layer = int(name.split(".")[2])
        inter = module.intermediate_size
        for local, e in enumerate(module.expert_ids):
            if name.endswith("gate_up_proj"):
                out[expert_tensor_name(layer, e, "gate_proj")] = param[local, :inter].contiguous()
                out[expert_tensor_name(layer, e, "up_proj")] = param[local, inter:].contiguous()
            else:
                out[expert_tensor_name(layer, e, "down_proj")] = param[local].contiguous()
    return out


def select_names(
    config: MiMoConfig,
    *,
    dense: bool = True,
    mtp: bool = True,
    experts: Iterable[tuple[int, int]] | str = "all",
) -> list[str]:
    """Hub names to load: the dense part (with or without MTP) and `experts`: "all", "none" or
    explicit (layer, expert) pairs."""
    names = []
    for name in hub_shapes(config):
        parsed = parse_expert_name(name)
        if parsed is None and dense and (mtp or not name.startswith("model.mtp.")):
            names.append(name)
    if experts == "all":
        pairs: Iterable[tuple[int, int]] = (
            (layer, e)
            for layer in range(config.num_hidden_layers)
            if config.is_moe_layer[layer]
            for e in range(config.num_experts)
        )
    elif experts == "none":
        pairs = ()
    elif isinstance(experts, str):
        raise ValueError(f"experts must be 'all', 'none' or (layer, expert) pairs, got {experts!r}")
    else:
        pairs = experts
    for layer, e in pairs:
        if not (0 <= layer < config.num_hidden_layers and config.is_moe_layer[layer]):
            raise ValueError(f"layer {layer} is not an MoE layer")
        if not 0 <= e < config.num_experts:
            raise ValueError(f"expert {e} out of range [0, {config.num_experts})")
        names.extend(expert_tensor_name(layer, e, p) for p in EXPERT_PROJS)
    return names


def load_tensors(
    reader: CheckpointReader, names: list[str], dtype: torch.dtype, device: str | torch.device, progress: bool
) -> dict[str, torch.Tensor]:
    fp32 = [n for n in names if is_fp32_tensor(n)]
    rest = [n for n in names if not is_fp32_tensor(n)]
    tensors = reader.load(rest, dtype=dtype, device=device, progress=progress)
    tensors.update(reader.load(fp32, dtype=torch.float32, device=device, progress=False))
    return tensors


def stack_experts(config: MiMoConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub tensors -> model state: per-expert tensors stacked per layer in expert-id order, gate and
    up fused into gate_up_proj [E, 2I, H]."""
    state: dict[str, torch.Tensor] = {}
    grouped: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}
    for name, t in tensors.items():
        parsed = parse_expert_name(name)
        if parsed is None:
            state[name] = t
        else:
            layer, e, proj = parsed
            grouped.setdefault((layer, proj), []).append((e, t))
    for (layer, proj), items in grouped.items():
        if proj == "up_proj":
            continue
        items.sort(key=lambda it: it[0])
        prefix = f"model.layers.{layer}.mlp.experts."
        if proj == "down_proj":
            state[prefix + "down_proj"] = torch.stack([t for _, t in items])
        else:
            ups = sorted(grouped[(layer, "up_proj")], key=lambda it: it[0])
            assert [e for e, _ in ups] == [e for e, _ in items], f"layer {layer}: gate and up experts differ"
            state[prefix + "gate_up_proj"] = torch.stack(
                [torch.cat((g, u)) for (_, g), (_, u) in zip(items, ups, strict=True)]
            )
    return state


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    experts: str = "all",
    mtp: bool = True,
    progress: bool = False,
    config: MiMoConfig | None = None,
) -> MiMoForCausalLM:
    """Builds the model on the meta device and fills it from the checkpoint without a copy.

    experts="none" leaves expert weights unloaded (on meta): the attention replica's view, whose
    MoE layers dispatch to expert shards instead. mtp=False skips the MTP blocks' weights. A
    checkpoint storing no MTP tensor gives a model without MTP blocks (`config.num_mtp_layers` 0)
    and logs one warning.
    """
    root = Path(path)
    declared = config or MiMoConfig.from_file(root)
    reader = CheckpointReader(root, quantization_config=quantization_dict(declared))
    cfg = without_absent_mtp(declared, reader.names())
    if cfg.num_mtp_layers < declared.num_mtp_layers:
        logger.warning(
            "checkpoint %s stores no MTP tensors (%s*) although its config declares %d MTP blocks: "
            "loading it without MTP, so MTP drafting is unavailable (num_mtp_drafts must be 0)",
            root,
            MTP_PREFIX,
            declared.num_mtp_layers,
        )
    validate_names_and_shapes(reader, hub_shapes(cfg))
    with torch.device("meta"):
        model = MiMoForCausalLM(cfg, source=root)
    names = select_names(cfg, mtp=mtp, experts=experts)
    state = stack_experts(cfg, load_tensors(reader, names, dtype, device, progress))
    model.load_state_dict(state, strict=False, assign=True)
    move_buffers(model, device)
    cast_model(model, dtype)
    model.eval()
    return model


def move_buffers(module: torch.nn.Module, device: str | torch.device) -> None:
    """Puts the buffers built on the CPU (RoPE frequencies, expert-slot maps) on the weights' device.

    A model built on meta and filled with load_state_dict(assign=True) takes each weight's device,
    but the buffers it computed itself stay where they were made; `module.to` cannot be used
    instead, since an attention replica's expert weights stay on meta.
    """
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and not buf.is_meta and buf.device != torch.device(device):
                sub._buffers[name] = buf.to(device)


def quantization_dict(config: MiMoConfig) -> dict[str, object] | None:
    """The config's `quantization_config` as `CheckpointReader` takes it (None: not quantized)."""
    q = config.quantization
    if q is None:
        return None
    return {
        "quant_method": q.quant_method,
        "fmt": q.fmt,
        "weight_block_size": list(q.weight_block_size),
        "ignored_layers": sorted(q.ignored_layers),
    }
