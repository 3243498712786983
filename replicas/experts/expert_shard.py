"""An expert shard: the experts of some (layer, expert) pairs, and their SwiGLU on dispatched rows.

It loads only its own tensors from the checkpoint (memory-mapped; never the whole model) and runs
one grouped computation per message: rows [R, H] with each row's chosen expert ids and combine
weights, where pairs computed on another shard carry the id `num_experts` (NOT_HERE). It returns
the weighted partial sum over the pairs it owns, and counts tokens and compute time per expert.
An FP8 checkpoint's experts stay FP8 in memory, dequantized per call (`fp8_experts.py`).
Plain class: `ExpertShardActor` (`replicas/experts/expert_pool.py`) hosts it in a Ray actor, the gloo shard
loop (`replicas/experts/transport_collective.py`) in a process, tests and the in-process transport
call it directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mimo.checkpoint import CheckpointReader
from mimo.config import MiMoConfig
from mimo.fp8 import FP8_DTYPE
from mimo.moe import Experts, Routing
from mimo.weights import load_tensors, move_buffers, quantization_dict, select_names, stack_experts
from replicas.experts.expert_placement import ExpertKey
from replicas.experts.fp8_experts import FP8Experts

LayerExperts = Experts | FP8Experts  # one layer's experts held here: dequantized, or FP8 until a call


@dataclass(frozen=True)
class ShardStats:
    """What a shard computed since its last drain (sent to the pool that owns it)."""

    token_counts: dict[tuple[int, int], int]  # (layer, expert) -> token rows
    compute_s: float
    num_messages: int


class ExpertShard:
    def __init__(self, config: MiMoConfig, experts: dict[int, LayerExperts]) -> None:
        self.config = config
        self.experts = experts  # layer -> the experts of that layer held here
        self.token_counts: dict[int, torch.Tensor] = {}  # layer -> tokens per global expert id [E]
        self.compute_s = 0.0
        self.num_messages = 0

    @staticmethod
    def load(
        path: str | Path,
        keys: Sequence[ExpertKey],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        keep_fp8: bool = True,
    ) -> ExpertShard:
        """The experts `keys` from the checkpoint at `path`, computing in `dtype` on `device`. Experts
        stored as FP8 stay FP8 (dequantized per call) unless `keep_fp8` is False, which dequantizes
        them to `dtype` here; either way outputs are bit-identical."""
        config = MiMoConfig.from_file(path)
        reader = CheckpointReader(Path(path), quantization_config=quantization_dict(config))
        by_layer: dict[int, list[int]] = {}
        for layer, e in keys:
            by_layer.setdefault(layer, []).append(e)
        experts: dict[int, LayerExperts] = {}
        names = select_names(config, dense=False, experts=sorted(keys))
        if keep_fp8 and names and all(reader.dtype(n) == FP8_DTYPE for n in names):
            stored = reader.load_fp8(names, device)
            for layer, ids in by_layer.items():
                experts[layer] = FP8Experts.from_hub(config, layer, ids, stored, reader.block, dtype)
            return ExpertShard(config, experts)
        state = stack_experts(config, load_tensors(reader, names, dtype, device, progress=False))
        for layer, ids in by_layer.items():
            with torch.device("meta"):
                module = Experts(config, expert_ids=sorted(ids))
            prefix = f"model.layers.{layer}.mlp.experts."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, assign=True
            )
            move_buffers(module, device)
            experts[layer] = module.eval()
        return ExpertShard(config, experts)

    def subset(self, keys: Sequence[ExpertKey]) -> ExpertShard:
        """A shard holding only `keys` (all held here), sliced from this one without a disk read."""
        by_layer: dict[int, list[int]] = {}
        for layer, e in keys:
            by_layer.setdefault(layer, []).append(e)
        experts: dict[int, LayerExperts] = {}
        for layer, ids in by_layer.items():
            old = self.experts[layer]
            ids = sorted(ids)
            if isinstance(old, FP8Experts):
                experts[layer] = old.subset(self.config, ids)
                continue
            index = old.local_index[torch.tensor(ids, device=old.local_index.device)]
            assert bool((index >= 0).all()), f"layer {layer}: subset asks for experts not held here"
            with torch.device("meta"):
                module = Experts(self.config, expert_ids=ids)
            module.load_state_dict(
                {"gate_up_proj": old.gate_up_proj[index], "down_proj": old.down_proj[index]}, assign=True
            )
            experts[layer] = module.eval()
        return ExpertShard(self.config, experts)

    @property
    def keys(self) -> list[ExpertKey]:
        return sorted((layer, e) for layer, m in self.experts.items() for e in m.expert_ids)

    @property
    def weight_bytes(self) -> int:
        """Resident bytes of the expert weights held here (FP8 stacks with their scales, or
        dequantized): what `mimo inspect` sizes a shard at."""
        return sum(
            m.nbytes
            if isinstance(m, FP8Experts)
            else sum(p.untyped_storage().nbytes() for p in (m.gate_up_proj, m.down_proj))
            for m in self.experts.values()
        )

    @torch.inference_mode()
    def compute(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x [R, H], expert_ids/weights [R, k] -> weighted partial output [R, H] of this shard's pairs."""
        start = time.perf_counter()
        module = self.experts[layer]
        dtype = module.dtype if isinstance(module, FP8Experts) else module.gate_up_proj.dtype
        out = module(x.to(dtype), Routing(expert_ids, weights))  # wire rows are fp32
        # NOT_HERE pairs carry id num_experts and fall in the dropped last bin
        counts = torch.bincount(expert_ids.flatten(), minlength=self.config.num_experts + 1)[:-1]
        counts = counts * (module.local_index[:-1] >= 0)  # only experts held here
        if layer in self.token_counts:
            self.token_counts[layer] += counts
        else:
            self.token_counts[layer] = counts
        self.compute_s += time.perf_counter() - start
        self.num_messages += 1
        return out

    def drain_stats(self) -> ShardStats:
        """Per-expert token counts and compute seconds since the last drain."""
        token_counts = {
            (layer, e): int(n)
            for layer, c in self.token_counts.items()
            for e, n in enumerate(c.tolist())
            if n
        }
        stats = ShardStats(token_counts, self.compute_s, self.num_messages)
        self.token_counts = {}
        self.compute_s = 0.0
        self.num_messages = 0
        return stats
