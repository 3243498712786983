"""API keys: loaded from a file (one key per line; a mounted Kubernetes secret is such a file), kept
only as SHA-256 digests and compared in constant time. A key's id (a digest prefix) names the tenant
for rate limits and salts its prefix-cache hashes, so tenants never share cached blocks.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tenant:
    key_id: str  # "anon" when auth is off
    cache_salt: str | None  # None when auth is off: local single-tenant use shares the cache


ANONYMOUS = Tenant("anon", None)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _bearer_digest(authorization: str | None) -> bytes | None:
    """The digest of the key in an `Authorization: Bearer KEY` header (the scheme in any case, as
    HTTP auth schemes are case-insensitive), or None."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return _digest(key)


def _tenant_id(digest: bytes) -> str:
    return digest.hex()[:16]


def claimed_cache_salt(authorization: str | None) -> str | None:
    """The cache salt of the tenant a `Bearer KEY` header claims to be, without checking the key:
    for a router, which only predicts where a prompt is cached. A valid key's salt is its tenant's
    `cache_salt`; a wrong key's matches no cached block (and its replica answers 401)."""
    digest = _bearer_digest(authorization)
    return None if digest is None else _tenant_id(digest)


class KeyStore:
    def __init__(self, digests: list[bytes]) -> None:
        self._digests = digests

    @staticmethod
    def from_file(path: str | Path) -> KeyStore:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"{path} holds no API keys")
        return KeyStore([_digest(k) for k in keys])

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of a `Bearer KEY` header, or None. Every stored digest is compared (no early
        exit), so timing reveals neither which key nor how much of it matched."""
        if not self._digests:
            return ANONYMOUS
        candidate = _bearer_digest(authorization)
        if candidate is None:
            return None
        match: bytes | None = None
        for digest in self._digests:
            if hmac.compare_digest(candidate, digest):
                match = digest
        if match is None:
            return None
        key_id = _tenant_id(match)
        return Tenant(key_id, key_id)
