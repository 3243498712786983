"""The wire format of one expert-shard message, shared by the remote transports.

A message's rows travel as ONE fp32 tensor [R, H + 2k]: x, the chosen expert ids as exact floats
(ids < 2^24) and the combine weights. One contiguous buffer per shard per layer means one send (or
one Ray argument) instead of three, and numpy views of it cross Ray's object store without a copy.
"""

from __future__ import annotations

import torch


def pack_into(out: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Fills out [R, H + 2k] (fp32) from x [R, H], expert_ids [R, k], weights [R, k]."""
    h, top_k = x.shape[1], expert_ids.shape[1]
    out[:, :h] = x
    out[:, h : h + top_k] = expert_ids
    out[:, h + top_k :] = weights


def pack(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], x.shape[1] + 2 * expert_ids.shape[1])
    pack_into(out, x, expert_ids, weights)
    return out


def unpack(body: torch.Tensor, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """body [R, H + 2k] -> x [R, H] (a view), expert_ids [R, k] (long), weights [R, k] (a view)."""
    top_k = (body.shape[1] - hidden_size) // 2
    x = body[:, :hidden_size]
    return x, body[:, hidden_size : hidden_size + top_k].to(torch.long), body[:, hidden_size + top_k :]


def grown(capacity: int, rows: int) -> int:
    """The buffer capacity in rows once `rows` must fit: doubled until it does, so buffers grow rarely
    (the collective transport and the channel both grow their buffers by it)."""
    while capacity < rows:
        capacity *= 2
    return capacity
