"""Tensor parallelism for one attention replica spanning several devices (DeepSpeed AutoTP).

`deepspeed.init_inference` with an injection policy for our modules slices every attention's
q/k/v projections by heads (column-parallel) and all-reduces after o_proj (row-parallel), the same
for the dense SwiGLU MLPs (layer 0, MTP blocks), and splits lm_head over the hidden dimension. The
router and expert halves are left whole (experts live on expert shards), as are the embedding and
the MTP blocks' eh_proj. AutoTP cannot know our head bookkeeping, so each rank then narrows its
attention shapes and attention-sink biases to the heads it holds. Every rank runs the same inputs
and gets the same logits. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
from torch import nn

from mimo.attention import Attention
from mimo.layers import DenseMLP
from mimo.model import MiMoForCausalLM

# AutoTP names a child linear by "<parent path>.<name>"; keyed by the module class itself the parent
# path is empty, hence the leading dot. Everything else under these modules is column-parallel.
INJECTION_POLICY: dict[type[nn.Module], tuple[str, ...]] = {
    Attention: (".o_proj",),
    DenseMLP: (".down_proj",),
}


@dataclass(frozen=True)
class TPRank:
    """Where this process sits in its replica's tensor-parallel group."""

    rank: int
    tp_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "gloo"
    timeout_s: float = 300.0  # a collective (or the rendezvous) waiting longer raises, not hangs

    def export_env(self) -> None:
        """The variables DeepSpeed's launcher would set; LOCAL_SIZE sizes its CPU accelerator."""
        os.environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.rank),
            WORLD_SIZE=str(self.tp_size),
            LOCAL_SIZE=str(self.tp_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def check_divisible(model: MiMoForCausalLM, tp_size: int) -> None:
    """Query and KV heads of every attention must split evenly over the ranks."""
    c = model.config
    for name, shape in (("", c.full_attention), ("swa_", c.sliding_attention), ("mtp ", c.mtp_attention)):
        for field, heads in (
            ("num_attention_heads", shape.num_q_heads),
            ("num_key_value_heads", shape.num_kv_heads),
        ):
            if heads % tp_size:
                raise ValueError(f"{name}{field} {heads} is not divisible by tp_size {tp_size}")


def shard_model(model: MiMoForCausalLM, tp: TPRank) -> MiMoForCausalLM:
    """Slices `model` in place for rank `tp.rank` (call in every rank, same weights); returns it."""
    import deepspeed  # heavy import, only where tensor parallelism is used

    check_divisible(model, tp.tp_size)
    tp.export_env()
    if tp.backend == "gloo":
        _skip_shm_comm_build()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=tp.backend, auto_mpi_discovery=False, timeout=timedelta(seconds=tp.timeout_s)
        )
    dtype = model.lm_head.weight.dtype
    # grain 1: AutoTP's default grain (64) splits a 96-wide k_proj 64/32, across a head; with
    # heads divisible by tp_size, even splits fall on head boundaries
    engine = deepspeed.init_inference(
        model,
        tensor_parallel={"tp_size": tp.tp_size, "tp_grain_size": 1},
        dtype=dtype,
        injection_policy=INJECTION_POLICY,
    )
    sharded = engine.module
    assert isinstance(sharded, MiMoForCausalLM)
    for module in sharded.modules():
        if isinstance(module, Attention):
            _narrow_heads(module, tp.rank, tp.tp_size)
    sharded.lm_head = _RowsHead(sharded.lm_head)  # type: ignore[assignment]  # duck-types Linear
    return sharded


def _skip_shm_comm_build() -> None:
    """Keeps DeepSpeed from JIT-compiling its CPU shared-memory all-reduce when a rank starts.

    The build needs a compiler on the serving host and serialises on a lock file under
    ~/.cache/torch_extensions; a rank killed mid-build leaves the lock behind and every later rank
    on that host waits on it forever (seen: CI hung on it). gloo's all-reduce is
    exact and needs no build; GPU ranks use NCCL and never reach this."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _narrow_heads(attn: Attention, rank: int, tp_size: int) -> None:
    """AutoTP split q/k/v by contiguous columns, i.e. heads [rank * n / tp, (rank + 1) * n / tp)."""
    s = attn.shape
    q_heads, kv_heads = s.num_q_heads // tp_size, s.num_kv_heads // tp_size
    attn.shape = replace(s, num_q_heads=q_heads, num_kv_heads=kv_heads)
    if attn.attention_sink_bias is not None:
        mine = attn.attention_sink_bias.detach()[rank * q_heads : (rank + 1) * q_heads].clone()
        attn.attention_sink_bias = nn.Parameter(mine, requires_grad=False)


class _RowsHead(nn.Module):
    """DeepSpeed's row-parallel lm_head slices its input as [B, T, H]; the engine passes [N, H]."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.weight = head.weight  # callers read the dtype from here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            out: torch.Tensor = self.head(x.unsqueeze(0)).squeeze(0)
            return out
        result: torch.Tensor = self.head(x)
        return result
