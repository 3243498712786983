"""Chained block hashes: the exact bytes hashed, chaining, salts, and cross-process stability."""

from __future__ import annotations

import ast
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import block_hash
from protocol.block_hash import block_hashes, hash_block, next_block_hashes, root_hash


def test_pinned_values() -> None:
    """Catches any change of the hashing scheme, which would silently break the router's index."""
    assert root_hash() == 9259095237378309269
    assert root_hash("tenant-a") == 13149604422172594248
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == [14817080731236634212, 10443330660391753]


def test_hashes_parent_and_uint32_little_endian_tokens() -> None:
    """Catches hashing other bytes than documented (native endianness, Python hash, no parent)."""
    parent = root_hash()
    expected = hashlib.blake2b(
        parent.to_bytes(8, "little") + struct.pack("<4I", 1, 2, 3, 70000), digest_size=8
    )
    assert hash_block(parent, [1, 2, 3, 70000]) == int.from_bytes(expected.digest(), "little")


def test_only_full_blocks() -> None:
    """Catches hashing a trailing partial block, which could be cached while still growing."""
    assert len(block_hashes(list(range(11)), 4)) == 2
    assert block_hashes(list(range(3)), 4) == []


def test_chained_so_equal_blocks_after_different_prefixes_differ() -> None:
    """Catches hashing blocks independently: a block's KV depends on everything before it."""
    first = block_hashes([1, 1, 2, 2], 2)
    second = block_hashes([3, 3, 2, 2], 2)
    assert first[1] != second[1]
    assert block_hashes([1, 1, 2, 2, 5, 5], 2)[:2] == first


def test_salt_changes_every_hash() -> None:
    """Catches a salt that only changes the first block, or None and "" colliding across tenants."""
    tokens = list(range(12))
    plain, salted, empty = (block_hashes(tokens, 4, salt) for salt in (None, "tenant-a", ""))
    assert all(a != b for a, b in zip(plain, salted, strict=True))
    assert all(a != b for a, b in zip(plain, empty, strict=True))


def test_parent_continues_a_chain() -> None:
    """Catches `parent` being ignored or the salt being re-applied mid-chain."""
    full = block_hashes(list(range(12)), 4, salt="t")
    assert block_hashes(list(range(4, 12)), 4, salt="other", parent=full[0]) == full[1:]


@settings(max_examples=50, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40),
    block_size=st.integers(1, 6),
    split=st.integers(0, 40),
    salt=st.sampled_from([None, "a"]),
)
def test_extend_equals_full_recompute(
    tokens: list[int], block_size: int, split: int, salt: str | None
) -> None:
    """Catches the incremental helper drifting from a fresh hash of the grown sequence."""
    known = block_hashes(tokens[: min(split, len(tokens))], block_size, salt)
    assert known + next_block_hashes(known, tokens, block_size, salt) == block_hashes(
        tokens, block_size, salt
    )


def test_bad_arguments() -> None:
    """Catches a zero block size looping forever, or known hashes longer than the tokens."""
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1], 0)
    with pytest.raises(ValueError, match="known_hashes"):
        next_block_hashes([1, 2], [1, 2, 3], 2)


def test_same_value_in_another_process_with_another_hash_seed() -> None:
    """Catches use of Python's salted `hash()`: router and engine run in different processes."""
    code = "from protocol.block_hash import block_hashes; print(block_hashes(list(range(9)), 4, 'x'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == str(block_hashes(list(range(9)), 4, "x"))


def test_standard_library_only() -> None:
    """Catches a torch/numpy import creeping in: the router imports this module."""
    tree = ast.parse(Path(block_hash.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "hashlib", "struct", "collections.abc"}
