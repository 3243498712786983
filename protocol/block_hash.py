"""Chained hashes of full token blocks: the key of the prefix cache, shared by engine and router.

Block i's hash covers its parent's hash and its own token ids, so equal hashes mean equal
prefixes. blake2b over fixed little-endian bytes (never Python's `hash()`) makes the value the
same in every process and on every machine; a per-tenant salt changes every hash of the chain.
Standard library only: the router imports this exact module.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_VERSION = b"mimo-block-hash/v1"


def root_hash(salt: str | None = None) -> int:
    """The parent of block 0: a constant, or a tenant-specific value when `salt` is given."""
    data = HASH_VERSION if salt is None else HASH_VERSION + b"\x00salt\x00" + salt.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def hash_block(parent: int, block_token_ids: Sequence[int]) -> int:
    """H(parent as 8 little-endian bytes, tokens as little-endian uint32) as an unsigned int."""
    digest = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    digest.update(struct.pack(f"<{len(block_token_ids)}I", *block_token_ids))
    return int.from_bytes(digest.digest(), "little")


def block_hashes(
    token_ids: Sequence[int], block_size: int, salt: str | None = None, parent: int | None = None
) -> list[int]:
    """Hashes of the FULL blocks of `token_ids` (a trailing partial block gets none).

    `parent` continues an existing chain (the hash of the block just before `token_ids[0]`); the
    salt only seeds the root, so it is ignored when `parent` is given.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    previous = root_hash(salt) if parent is None else parent
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash_block(previous, token_ids[start : start + block_size])
        hashes.append(previous)
    return hashes


def next_block_hashes(
    known_hashes: Sequence[int], token_ids: Sequence[int], block_size: int, salt: str | None = None
) -> list[int]:
    """Hashes of the full blocks of `token_ids` after the `len(known_hashes)` already hashed.

    For a growing sequence: `known.extend(next_block_hashes(known, tokens, ...))` hashes only the
    blocks that became full, so a decode step costs nothing until a block fills.
    """
    num_known = len(known_hashes)
    if num_known * block_size > len(token_ids):
        raise ValueError(f"known_hashes covers {num_known} blocks but token_ids has {len(token_ids)} tokens")
    if (num_known + 1) * block_size > len(token_ids):
        return []
    parent = known_hashes[-1] if known_hashes else None
    return block_hashes(token_ids[num_known * block_size :], block_size, salt, parent)
