"""The MoE half of a MiMo-V2-Flash layer: the sigmoid `noaux_tc` router and stacked SwiGLU experts.

The router runs where attention runs; `Experts` may hold only a subset of a layer's experts (an
expert shard) and then returns the weighted sum over the experts it holds, so shards' partial
outputs add up to the full layer output. Expert weights are stacked per layer, gate and up fused
as transformers does: gate_up [E_local, 2I, H] (gate rows first), down [E_local, H, I].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimo.config import MiMoConfig
from mimo.linear import PackedWeight, linear, pad_rows, row_bucket, runs_in_onednn

# A single token with up to this many chosen experts takes the plain loop (decode at batch 1).
_PAIR_LOOP_MAX = 16
# Batches of 2 to _DENSE_MAX_ROWS rows (decode) that the union below does not take run every local
# expert on every row, weighted 0 where not chosen (`_dense`): two matmuls over the stacked experts,
# which on the CPU read oneDNN packs (`pack`). A decode batch touches most experts anyway (8 rows
# pick ~14 of 16), so this reads the same weights as per-expert batches and skips their
# bookkeeping (~30 ops per layer). In interleaved A/Bs here at 8 rows the MoE's share of a decode
# step fell from 4.5 to 3.6 ms (bf16, against padded batches on plain weights) and from 4.8 to 3.6
# ms (fp32).
_DENSE_MAX_ROWS = 32
# Larger batches run padded batched experts while E_local x max rows per expert stays within this
# many x the pairs, or within _PADDED_SMALL_ROW_EXPERTS: there the per-expert loop's ops cost more
# than the padding (at 32 rows its 16 matmul pairs were slower than padding 2-4x). Trained routers
# are skewed (a 512-token chunk of the tiny model: 0 to 460 rows per expert), so a looser bound pads
# most prefill chunks 3-4x: 2.2-2.6x slower than per-expert matmuls at 256-512 rows, measured here.
_PADDED_WASTE_MAX = 1.5
_PADDED_SMALL_ROW_EXPERTS = 512
# A small batch (rows x local experts at most _UNION_MAX_ROW_EXPERTS) whose rows together chose at
# most this fraction of the local experts loops over those experts (an MTP verify of 4 rows picks
# ~5 of 16: reading 5 experts' weights beats all 16).
_UNION_MAX_ROW_EXPERTS = 256
_UNION_MAX_FRACTION = 0.5


@dataclass(frozen=True)
class Routing:
    """Per token: chosen expert ids [N, k] (global ids) and their combine weights [N, k] (fp32)."""

    expert_ids: torch.Tensor
    weights: torch.Tensor


class Router(nn.Module):
    """logits = h @ W.T in fp32; top-k of sigmoid + correction bias; weights = unbiased sigmoid."""

    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(config.num_experts, dtype=torch.float32), requires_grad=False
        )
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> Routing:
        # x [N, H] -> Routing over N tokens; casts and a scaling of 1 are skipped (each is an op, and
        # the decode step is bound by op count), which changes no value
        w, bias = self.weight, self.e_score_correction_bias
        scores = torch.sigmoid(F.linear(_fp32(x), _fp32(w)))
        ids = torch.topk(scores + _fp32(bias), self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(ids, weights if self.scaling == 1.0 else weights * self.scaling)


class Experts(nn.Module):
    """SwiGLU experts of one layer; `expert_ids` lists the global ids held here, in storage order."""

    def __init__(self, config: MiMoConfig, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        ids = list(range(config.num_experts)) if expert_ids is None else list(expert_ids)
        h, inter = config.hidden_size, config.moe_intermediate_size
        self.expert_ids = tuple(ids)
        self.intermediate_size = inter
        # Shapes are the hub's (gate_up [E, 2I, H], down [E, H, I]); gate_up is stored as the hub's
        # (bmm reads it transposed, which BLAS and oneDNN take as is), down as [E, I, H] (contiguous
        # for bmm; `_union` reads each expert's transposed).
        self.gate_up_proj = nn.Parameter(torch.empty(len(ids), 2 * inter, h))
        self.down_proj = nn.Parameter(torch.empty(len(ids), inter, h).transpose(1, 2))
        # load_state_dict(assign=True) installs the checkpoint's contiguous tensors: lay them out again
        self.register_load_state_dict_post_hook(_relayout_after_load)
        # global expert id -> local slot (-1: not held); on the CPU even when built on meta. The extra
        # last entry is the id dispatchers use for "this pair is computed elsewhere" (NOT_HERE).
        local = torch.full((config.num_experts + 1,), -1, dtype=torch.long, device="cpu")
        local[torch.tensor(ids, dtype=torch.long, device="cpu")] = torch.arange(len(ids), device="cpu")
        self.local_index: torch.Tensor
        self.register_buffer("local_index", local, persistent=False)
        # the same map with "not held" sent to an extra column (len(ids)) that `_row_weights` drops
        self.weight_column: torch.Tensor
        self.register_buffer("weight_column", torch.where(local >= 0, local, len(ids)), persistent=False)
        self.local_ids: list[int] = local.tolist()  # local_index as a list, for host-side bookkeeping
        self.packed: tuple[PackedWeight, PackedWeight] | None = None  # see pack()

    def pack(self) -> None:
        """Packs the stacked experts for `_dense` (CPU: mimo/linear.py's PackedWeight)."""
        self.packed = (PackedWeight(), PackedWeight()) if PackedWeight.supports(self.gate_up_proj) else None

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [N, H] -> [N, H]: sum over the token's chosen experts held here of weight * expert(x)."""
        top_k = routing.expert_ids.shape[1]
        num_rows, num_local = x.shape[0], len(self.expert_ids)
        if num_rows > 1 and num_rows * num_local <= _UNION_MAX_ROW_EXPERTS:
            chosen = sorted({self.local_ids[e] for e in routing.expert_ids.view(-1).tolist()} - {-1})
            if len(chosen) <= _UNION_MAX_FRACTION * num_local:
                return self._union(x, routing, chosen)
        if 1 < num_rows <= _DENSE_MAX_ROWS:
            return self._dense(x, routing)
        local = self.local_index[routing.expert_ids].reshape(-1)  # [N*k], -1 where not held here
        if local.numel() <= _PAIR_LOOP_MAX and x.shape[0] == 1:
            return self._single_token(x, local.tolist(), routing.weights.reshape(-1).tolist())
        held = (local >= 0).nonzero().squeeze(1)
        out = torch.zeros_like(x)
        if held.numel() == 0:
            return out
        local_held = local[held]
        order = torch.argsort(local_held, stable=True)
        slots = held[order]
        tokens = slots // top_k
        weights = routing.weights.reshape(-1)[slots].to(x.dtype)
        experts_sorted = local_held[order]
        counts = torch.bincount(experts_sorted, minlength=num_local)
        capacity = int(counts.max())
        if capacity * num_local <= max(_PADDED_WASTE_MAX * held.numel(), _PADDED_SMALL_ROW_EXPERTS):
            expert_out = self._padded(x[tokens], experts_sorted, counts, capacity)
        else:
            expert_out = self._grouped(x[tokens], experts_sorted, counts.tolist())
        return out.index_add(0, tokens, expert_out * weights[:, None])

    def _union(self, x: torch.Tensor, routing: Routing, chosen: list[int]) -> torch.Tensor:
        """Every row through each local expert that any row chose (weight 0 where that row did not):
        reads only the chosen experts' weights, a few ops per expert."""
        if not chosen:
            return torch.zeros_like(x)
        weights = self._row_weights(x, routing)
        out = None
        for e in chosen:
            act = self._swiglu(linear(x, self.gate_up_proj[e])).mul_(weights[:, e : e + 1])  # [N, I]
            if out is None:
                out = linear(act, self.down_proj[e])
            else:
                out.addmm_(act, self.down_proj[e].t())
        assert out is not None
        return out

    def _dense(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Every row through every local expert, weighted by its routing weight (0 where not chosen):
        two matmuls over the experts stacked side by side, no per-expert bookkeeping."""
        num_local, inter = len(self.expert_ids), self.intermediate_size
        gate_up_w = self.gate_up_proj.view(num_local * 2 * inter, -1)  # [E*2I, H]
        down_w = self.down_proj.transpose(1, 2).reshape(num_local * inter, -1).t()  # [H, E*I]
        gate_up_p, down_p = self.packed if self.packed is not None else (None, None)
        gate_up = linear(x, gate_up_w, gate_up_p).view(-1, num_local, 2 * inter)
        gate, up = gate_up.split(inter, dim=-1)
        act = F.silu(gate).mul_(up).mul_(self._row_weights(x, routing).unsqueeze(-1))  # [N, E, I]
        return linear(act.view(x.shape[0], -1), down_w, down_p)

    def _row_weights(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """[N, E_local]: each row's combine weight per local expert (0 where it did not choose it)."""
        num_local = len(self.expert_ids)
        return x.new_zeros(x.shape[0], num_local + 1).scatter_(
            1, self.weight_column[routing.expert_ids], routing.weights.to(x.dtype)
        )[:, :num_local]

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return F.silu(gate) * up

    def _single_token(self, x: torch.Tensor, local: list[int], weights: list[float]) -> torch.Tensor:
        """Decode of one token: a plain loop over its few experts, no index bookkeeping (it reads only
        the chosen experts' weights, which at one token costs more than the ops)."""
        out = torch.zeros_like(x)
        for e, w in zip(local, weights, strict=True):
            if e >= 0:
                out.add_(linear(self._swiglu(linear(x, self.gate_up_proj[e])), self.down_proj[e]), alpha=w)
        return out

    def _padded(
        self, rows: torch.Tensor, experts_sorted: torch.Tensor, counts: torch.Tensor, capacity: int
    ) -> torch.Tensor:
        """Rows scattered into a zero-padded [E_local, capacity, H] batch: two bmm calls for all experts
        (a few ops instead of a loop over experts; `forward` bounds the padding). In low precision on
        the CPU the capacity is bucketed like `linear`'s rows (oneDNN compiles a kernel per shape)."""
        if runs_in_onednn(rows):
            capacity = row_bucket(capacity)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.shape[0], device=rows.device) - starts[experts_sorted]
        batch = rows.new_zeros(len(self.expert_ids), capacity, rows.shape[1])
        batch[experts_sorted, slot] = rows
        act = self._swiglu(torch.bmm(batch, self.gate_up_proj.transpose(1, 2)))  # [E, C, I]
        return torch.bmm(act, self.down_proj.transpose(1, 2))[experts_sorted, slot]  # [P, H]

    def _grouped(self, rows: torch.Tensor, experts_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Many pairs: one matmul pair per expert over its contiguous rows (in low precision on the
        CPU each expert's rows padded to `row_bucket`, as `linear` does, kept through both matmuls)."""
        bucketed = runs_in_onednn(rows)
        pieces = []
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            seg = rows[start : start + count]
            if bucketed:
                seg = pad_rows(seg, row_bucket(count))
            out = self._swiglu(seg @ self.gate_up_proj[e].T) @ self.down_proj[e].T
            pieces.append(out[:count])
            start += count
        return torch.cat(pieces)


class MoE(nn.Module):
    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return self.experts(flat, self.gate(flat)).view_as(x)


# storage order of each expert weight: dims of the hub shape, outermost first (see Experts.__init__)
_STORAGE_ORDER = {"down_proj": (0, 2, 1)}


def _relayout_after_load(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, Experts)
    for name, order in _STORAGE_ORDER.items():
        param = getattr(module, name)
        if not param.permute(order).is_contiguous():
            inverse = tuple(order.index(d) for d in range(3))
            laid_out = param.detach().permute(order).contiguous().permute(inverse)
            setattr(module, name, nn.Parameter(laid_out, requires_grad=param.requires_grad))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()
