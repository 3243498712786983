"""Global attention of a prefill chunk over a long key range, one key block at a time.

Late in a long prompt a chunk's queries see tens of thousands of GA keys. A score tensor over all of
them (and the causal mask beside it) per query block is hundreds of MB that the softmax reads and
writes several times, so the cost per token grew with the context far faster than the matmuls do.
Here each (query block, key block) pair is one score bmm that fits in cache, folded into a running
max, a running sum and an output accumulator (flash-attention style); the causal mask is made from
positions only for key blocks that cross the diagonal. A sink (MODEL.md: one more logit per query
head, with no value) starts the running max at its logit and the running sum at exp(0) = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ONLINE_KEYS = 1024  # keys per block: a [rows, 1024] fp32 score tile stays in cache
ONLINE_ROWS = 1024  # score rows per block (query heads of one KV head x queries)


@dataclass(frozen=True)
class Causal:
    """Where a GA group's queries and keys sit: gathered key j is position j (GA gathers from 0), query
    q of segment b is at starts[b] + q, and key j is visible to it iff j <= starts[b] + q (so keys
    gathered past a segment's end, the padding, are hidden too)."""

    starts: torch.Tensor  # [B] first query position of each segment, on the attention's device
    min_start: int
    max_start: int


def causal_for(starts: torch.Tensor, device: torch.device) -> Causal:
    return Causal(starts.to(device), int(starts.min()), int(starts.max()))


def online_attention(
    qg: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_keys: int,
    causal: Causal,
    sink: torch.Tensor | None,
    num_kv_heads: int,
    group: int,
) -> torch.Tensor:
    """qg [Hkv * B, G * Q, Dqk] (scaled), k [Hkv * B, Dqk, >= num_keys], v [Hkv * B, >= num_keys, Dv]
    (keys past num_keys, such as the zero sink slot, are ignored); sink [Hkv, 1, G, 1, 1] fp32 or
    None. -> [Hkv * B, G * Q, Dv], equal to the softmax over every visible key (and the sink) up to
    the order of fp32 sums."""
    hb, rows, dv = qg.shape[0], qg.shape[1], v.shape[-1]
    b, num_q = hb // num_kv_heads, rows // group
    q4 = qg.view(hb, group, num_q, -1)
    q_block = max(1, ONLINE_ROWS // group)
    outs = []
    for qs in range(0, num_q, q_block):
        qe = min(num_q, qs + q_block)
        n = qe - qs
        qb = q4[:, :, qs:qe].reshape(hb, group * n, -1)  # [Hkv * B, G * n, Dqk]
        if sink is None:
            run_max = qb.new_full((hb, group * n, 1), float("-inf"), dtype=torch.float32)
            run_sum = qb.new_zeros((hb, group * n, 1), dtype=torch.float32)
        else:
            run_max = sink.expand(num_kv_heads, b, group, n, 1).reshape(hb, group * n, 1).clone()
            run_sum = torch.ones_like(run_max)
        acc = qb.new_zeros((hb, group * n, dv), dtype=torch.float32)
        # key 0 is visible to every query, so the first block makes every running max finite
        for ks in range(0, min(num_keys, qe + causal.max_start), ONLINE_KEYS):
            ke = min(num_keys, ks + ONLINE_KEYS, qe + causal.max_start)
            scores = torch.bmm(qb, k[..., ks:ke]).float()  # [Hkv * B, G * n, Kb]
            if ke - 1 > causal.min_start + qs:  # some key lies past some query: the diagonal
                _mask_causal(scores, causal, qs, qe, ks, ke, num_kv_heads, group)
            new_max = torch.maximum(run_max, scores.amax(-1, keepdim=True))
            probs = scores.sub_(new_max).exp_()
            rescale = run_max.sub_(new_max).exp_()
            run_sum.mul_(rescale).add_(probs.sum(-1, keepdim=True))
            vb = v[:, ks:ke]
            if vb.dtype == torch.float32:
                acc.mul_(rescale).baddbmm_(probs, vb)
            else:  # low precision (CUDA): the PV matmul in V's dtype, accumulated in fp32
                acc.mul_(rescale).add_(torch.bmm(probs.to(vb.dtype), vb))
            run_max = new_max
        outs.append(acc.div_(run_sum).view(hb, group, n, dv))
    return torch.cat(outs, dim=2).view(hb, rows, dv).to(v.dtype)


def _mask_causal(
    scores: torch.Tensor, causal: Causal, qs: int, qe: int, ks: int, ke: int, num_kv_heads: int, group: int
) -> None:
    """Scores of keys [ks, ke) that queries [qs, qe) of each segment must not see set to -inf."""
    device = scores.device
    q_pos = causal.starts[:, None] + torch.arange(qs, qe, device=device)[None, :]  # [B, n]
    hidden = torch.arange(ks, ke, device=device)[None, None, :] > q_pos[..., None]  # [B, n, Kb]
    b, n = q_pos.shape
    scores.view(num_kv_heads, b, group, n, ke - ks).masked_fill_(hidden[None, :, None], float("-inf"))
