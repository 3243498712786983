"""`gateway.auth`: the salt a router predicts from a key is the one the replica stores with."""

from __future__ import annotations

from pathlib import Path

from gateway.auth import KeyStore, claimed_cache_salt


def test_claimed_salt_is_the_authenticated_tenants_salt(tmp_path: Path) -> None:
    """Catches a route chooser hashing with another salt than the replica (every salted prompt would
    then look uncached to the router), and a missing or malformed header given a salt."""
    (tmp_path / "keys").write_text("sk-one\nsk-two\n")
    keys = KeyStore.from_file(tmp_path / "keys")
    for key in ("sk-one", "sk-two"):
        tenant = keys.authenticate(f"Bearer {key}")
        assert tenant is not None and claimed_cache_salt(f"Bearer {key}") == tenant.cache_salt
    assert claimed_cache_salt("Bearer sk-one") != claimed_cache_salt("Bearer sk-two")
    assert keys.authenticate("Bearer sk-wrong") is None
    assert claimed_cache_salt(None) is None and claimed_cache_salt("Basic abc") is None
