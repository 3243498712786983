"""How many KV blocks each pool gets: GA layers keep every token, SWA (and MTP) layers a window.

Both pools use one block size and the same logical indexing (block j holds positions
[j*block_size, (j+1)*block_size)); only their physical block counts differ. `plan_layout` splits a
byte budget so the SWA pool holds what the running sequences can see, plus spare cached windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayout:
    block_size: int  # tokens per block, both pools
    num_full_blocks: int  # physical blocks of the GA pool
    num_swa_blocks: int  # physical blocks of the SWA pool (SWA and MTP layers)
    window: int  # previous tokens an SWA query sees: query at p attends to keys [p - window, p]

    def __post_init__(self) -> None:
        for name in ("block_size", "num_full_blocks", "num_swa_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")


def swa_blocks_per_seq(window: int, block_size: int, num_step_positions: int) -> int:
    """Most SWA blocks one sequence holds while a step writes `num_step_positions` positions.

    The step's first query at p sees [p - window, p], so the sequence keeps window + C consecutive
    positions; L consecutive positions span at most ceil((L - 1) / block_size) + 1 blocks.
    """
    num_positions = window + max(1, num_step_positions)
    return -(-(num_positions - 1) // block_size) + 1


def plan_layout(
    *,
    budget_bytes: int,
    full_bytes_per_block: int,
    swa_bytes_per_block: int,
    block_size: int,
    window: int,
    max_running: int,
    max_step_tokens: int,
    max_model_len: int,
    num_lookahead_tokens: int = 0,
    swa_cache_factor: float = 2.0,
) -> KVLayout:
    """Split `budget_bytes` into a GA pool and an SWA pool.

    `max_step_tokens` is the scheduler's per-step token budget (drafts included); each sequence may
    also get `num_lookahead_tokens` extra slots. Sequence i writing C_i positions holds at most
    ceil((window + C_i - 1) / B) + 1 <= (window + C_i + 2B - 2) / B SWA blocks, so `max_running`
    sequences sharing sum C_i <= max_step_tokens + max_running * lookahead hold at most the floor
    of the summed bound. The SWA pool gets that times `swa_cache_factor` (the spare blocks keep
    windows of finished sequences for prefix hits), capped at half the budget; GA gets the rest.
    """
    for name, value in (
        ("budget_bytes", budget_bytes),
        ("full_bytes_per_block", full_bytes_per_block),
        ("swa_bytes_per_block", swa_bytes_per_block),
        ("block_size", block_size),
        ("max_running", max_running),
        ("max_step_tokens", max_step_tokens),
        ("max_model_len", max_model_len),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if window < 0 or num_lookahead_tokens < 0:
        raise ValueError(
            f"window and num_lookahead_tokens must be >= 0, got {window}, {num_lookahead_tokens}"
        )
    if swa_cache_factor < 1.0:
        raise ValueError(f"swa_cache_factor must be >= 1.0, got {swa_cache_factor}")

    num_step_positions = max_step_tokens + max_running * num_lookahead_tokens
    num_swa_running = (max_running * (window + 2 * block_size - 2) + num_step_positions) // block_size
    num_swa_one_seq = swa_blocks_per_seq(window, block_size, max_step_tokens + num_lookahead_tokens)
    num_swa_cap = (budget_bytes // 2) // swa_bytes_per_block
    num_swa_blocks = min(math.ceil(num_swa_running * swa_cache_factor), num_swa_cap)
    if num_swa_blocks < num_swa_one_seq:
        raise ValueError(
            f"num_swa_blocks: budget_bytes={budget_bytes} caps the SWA pool at {num_swa_cap} blocks, fewer "
            f"than the {num_swa_one_seq} one sequence needs (window {window} + step {max_step_tokens} "
            f"+ lookahead {num_lookahead_tokens} tokens)"
        )
    num_full_blocks = (budget_bytes - num_swa_blocks * swa_bytes_per_block) // full_bytes_per_block
    num_full_one_seq = -(-(max_model_len + num_lookahead_tokens) // block_size)
    if num_full_blocks < num_full_one_seq:
        raise ValueError(
            f"num_full_blocks: budget_bytes={budget_bytes} leaves {num_full_blocks} GA blocks, fewer than "
            f"the {num_full_one_seq} one max_model_len={max_model_len} sequence needs"
        )
    return KVLayout(block_size, num_full_blocks, num_swa_blocks, window)
