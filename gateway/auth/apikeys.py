"""API keys: shown once, stored as a prefix and a hash."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_TAG = "gk"
_KEY = re.compile(rf"^{KEY_TAG}_([0-9a-f]{{12}})_([A-Za-z0-9_\-]{{43}})$")


def hash_key(key: str) -> str:
    """The stored form of a key.

    A key carries 256 random bits, so a fast hash cannot be brute-forced and
    keeps the per-request check cheap; slow password hashes are for secrets
    people choose.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(key, prefix, hash) of a fresh key; only the prefix and hash are stored."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_TAG}_{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, hash_key(key)


def key_prefix(key: str) -> str | None:
    """The lookup prefix of a well-formed key, None for anything else."""
    m = _KEY.match(key)
    return m.group(1) if m else None


def matches(key: str, stored_hash: str) -> bool:
    """Compare in constant time."""
    return hmac.compare_digest(hash_key(key), stored_hash)
