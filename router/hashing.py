"""Prompt block hashes for routing, computed in chunks that yield to the event loop.

The router must hash exactly as the engine does (`protocol.block_hash`), but a long prompt costs about
2.5 µs per block on one core, so hashing runs `chunk_blocks` at a time between `sleep(0)` yields and
stops at `max_blocks`: other requests keep being routed while a 100K-token prompt is hashed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from protocol.block_hash import block_hashes


async def hash_prompt_blocks(
    token_ids: Sequence[int], block_size: int, salt: str | None, max_blocks: int, chunk_blocks: int
) -> list[int]:
    """The first min(full blocks, max_blocks) chained hashes of `token_ids`, as the engine has them."""
    num_blocks = min(len(token_ids) // block_size, max_blocks)
    hashes: list[int] = []
    for start in range(0, num_blocks, chunk_blocks):
        end = min(num_blocks, start + chunk_blocks)
        parent = hashes[-1] if hashes else None  # the salt only seeds the first block's parent
        hashes.extend(
            block_hashes(token_ids[start * block_size : end * block_size], block_size, salt, parent)
        )
        if end < num_blocks:
            await asyncio.sleep(0)
    return hashes
