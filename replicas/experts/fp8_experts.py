"""One layer's experts kept as an FP8 checkpoint stores them, dequantized just in time per call.

Resident: float8_e4m3fn gate, up and down stacks with their fp32 block scales, the ~1 byte per weight
that `mimo inspect --weight-dtype fp8` counts. A call dequantizes only the experts its rows chose,
with the load-time math (`mimo.fp8.dequantize_fp8_blocks`), into a transient full-size stack whose
other experts are zero, and runs `mimo.moe.Experts` on it: the same kernel and matmul shapes as a
shard dequantized at load, where a zero expert adds exactly what an unchosen one (weight 0) adds, so
outputs are bit-identical to that shard's. CUDA takes the same path: torch's block-scaled GEMM
(`F.scaled_mm`, BlockWise1x128 activations x BlockWise128x128 weights, sm90+) would skip the
dequant but needs FP8-quantized activations, which would change outputs against the dequantized path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from mimo.config import MiMoConfig
from mimo.fp8 import dequantize_fp8_blocks
from mimo.moe import Experts, Routing
from mimo.weights import expert_tensor_name, move_buffers


@dataclass(frozen=True)
class FP8Stack:
    """One projection of a layer's local experts: q [E, out, in] float8_e4m3fn, scale_inv [E, nbo, nbi]."""

    q: torch.Tensor
    scale_inv: torch.Tensor  # fp32
    block: tuple[int, int]  # (block_out, block_in) of q's last two dims

    @staticmethod
    def stacked(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], block: tuple[int, int]) -> FP8Stack:
        return FP8Stack(torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs]), block)

    def transposed(self) -> FP8Stack:
        """The same weights as [E, in, out] (each value keeps its scale: the tiles turn with it)."""
        q = self.q.transpose(1, 2).contiguous()
        scale_inv = self.scale_inv.transpose(1, 2).contiguous()
        return FP8Stack(q, scale_inv, (self.block[1], self.block[0]))

    def take(self, index: torch.Tensor) -> FP8Stack:
        return FP8Stack(self.q[index], self.scale_inv[index], self.block)

    def dequantize_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Writes local experts [start, stop) into those slots of `out` [E, out, in] (in its dtype)."""
        q, scale_inv = self.q[start:stop], self.scale_inv[start:stop]
        dequantize_fp8_blocks(q, scale_inv, self.block, out=out[start:stop])

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.q, self.scale_inv))


class FP8Experts:
    """Called like `Experts` (x [N, H], routing -> [N, H]). Each call briefly installs its transient
    weights on a weightless `Experts` (meta parameters), so calls on one object must not overlap (a
    shard computes one message at a time)."""

    def __init__(self, template: Experts, gate: FP8Stack, up: FP8Stack, down: FP8Stack, dtype: torch.dtype):
        self.template = template  # routing maps and kernels; its parameters stay on meta
        self.gate = gate  # [E, I, H]
        self.up = up  # [E, I, H]
        self.down = down  # [E, I, H]: the hub's [E, H, I] turned, as Experts stores down_proj
        self.dtype = dtype  # what each call dequantizes to and computes in

    @staticmethod
    def from_hub(
        config: MiMoConfig,
        layer: int,
        expert_ids: Sequence[int],
        stored: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        block: tuple[int, int],
        dtype: torch.dtype,
    ) -> FP8Experts:
        """The experts `expert_ids` (sorted) of `layer` from `CheckpointReader.load_fp8`'s tensors."""
        ids = sorted(expert_ids)

        def stack(proj: str) -> FP8Stack:
            return FP8Stack.stacked([stored[expert_tensor_name(layer, e, proj)] for e in ids], block)

        gate, up, down = stack("gate_proj"), stack("up_proj"), stack("down_proj").transposed()
        return FP8Experts(_template(config, ids, gate.q.device), gate, up, down, dtype)

    @property
    def expert_ids(self) -> tuple[int, ...]:
        return self.template.expert_ids

    @property
    def local_index(self) -> torch.Tensor:
        return self.template.local_index

    @property
    def nbytes(self) -> int:
        """Resident bytes: the FP8 stacks and their scales (no dequantized copy is kept)."""
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    def subset(self, config: MiMoConfig, expert_ids: Sequence[int]) -> FP8Experts:
        """The experts `expert_ids` (all held here), still FP8."""
        ids = sorted(expert_ids)
        index = self.local_index[torch.tensor(ids, device=self.local_index.device)]
        assert bool((index >= 0).all()), "subset asks for experts not held here"
        template = _template(config, ids, self.gate.q.device)
        return FP8Experts(
            template, self.gate.take(index), self.up.take(index), self.down.take(index), self.dtype
        )

    def __call__(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        local_ids = self.template.local_ids  # global id -> local slot, -1 where not held here
        chosen = {local_ids[e] for e in routing.expert_ids.view(-1).tolist()} - {-1}
        num_local, inter, h = self.gate.q.shape
        gate_up = x.new_empty(num_local, 2 * inter, h, dtype=self.dtype)  # as Experts.gate_up_proj
        down = x.new_empty(num_local, inter, h, dtype=self.dtype)  # Experts.down_proj's storage
        # runs of neighbouring slots: slices, not gathers (index_copy_ took longer than the dequant)
        for start, stop, is_chosen in _runs(chosen, num_local):
            if is_chosen:
                self.gate.dequantize_into(gate_up[:, :inter], start, stop)
                self.up.dequantize_into(gate_up[:, inter:], start, stop)
                self.down.dequantize_into(down, start, stop)
            else:
                gate_up[start:stop].zero_()
                down[start:stop].zero_()
        weights = {"gate_up_proj": gate_up, "down_proj": down.transpose(1, 2)}
        out: torch.Tensor = functional_call(self.template, weights, (x, routing))
        return out


def _runs(chosen: set[int], num_slots: int) -> list[tuple[int, int, bool]]:
    """Slots 0..num_slots cut into maximal runs [start, stop) that are all chosen or all not."""
    runs: list[tuple[int, int, bool]] = []
    start = 0
    for slot in range(1, num_slots + 1):
        if slot == num_slots or (slot in chosen) != (start in chosen):
            runs.append((start, slot, start in chosen))
            start = slot
    return runs


def _template(config: MiMoConfig, expert_ids: list[int], device: torch.device) -> Experts:
    """An `Experts` without weights (meta), its routing maps on `device`."""
    with torch.device("meta"):
        module = Experts(config, expert_ids=expert_ids)
    move_buffers(module, device)
    return module.eval()
