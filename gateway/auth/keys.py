"""Verification keys, each bound to exactly one algorithm.

Binding a key to one algorithm is what stops algorithm confusion: a token
that names HS256 can never be checked against an RSA public key used as an
HMAC secret, because no HS256 key exists in a public-key set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from jwt import PyJWK
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidKeyError, PyJWKError

from gateway.config.models import JWTConfig

# RFC 7518 3.2: an HMAC key at least as long as the hash output; a shorter
# secret can be brute-forced offline from a single token.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


class InvalidToken(Exception):
    """A token that must be refused; the message says why (safe to show)."""


class KeyConfigError(Exception):
    """A key source that cannot be used at all."""


@dataclass(frozen=True, slots=True)
class BoundKey:
    alg: str
    key: Any  # what PyJWT's algorithm for `alg` verifies with


class KeySource(Protocol):
    """Where the verifier gets the key for a token's `kid` and `alg`."""

    async def key(self, kid: str | None, alg: str) -> BoundKey: ...


def pick_key(keys: Mapping[str, BoundKey], kid: str | None) -> BoundKey | None:
    """The key named `kid`, or the only key when the token names none."""
    if kid is not None:
        return keys.get(kid)
    # Without a kid only an unambiguous set can answer.
    return next(iter(keys.values())) if len(keys) == 1 else None


def check_alg(bound: BoundKey | None, alg: str) -> BoundKey:
    """The key for `alg`, refusing a missing key or one bound to another algorithm."""
    if bound is None:
        raise InvalidToken("the token's key id is unknown")
    if bound.alg != alg:
        raise InvalidToken(f"the token's key is not a {alg} key")
    return bound


def hs_secret(config: JWTConfig) -> str:
    """The HS secret `secret_env` names; KeyConfigError if unset or too short for the
    algorithm (RFC 7518 3.2: at least the hash's size), for verifying and minting alike."""
    assert config.secret_env is not None
    secret = os.environ.get(config.secret_env, "")
    alg = config.algorithms[0]
    if len(secret.encode()) < MIN_SECRET_BYTES[alg]:
        raise KeyConfigError(
            f"environment variable {config.secret_env} must hold a secret of at least "
            f"{MIN_SECRET_BYTES[alg]} bytes for {alg}"
        )
    return secret


class StaticKeys:
    """An HS secret from the environment, or PEM public keys from files."""

    def __init__(self, keys: Mapping[str, BoundKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_config(cls, config: JWTConfig) -> StaticKeys:
        algorithms = get_default_algorithms()
        if config.secret_env is not None:
            alg = config.algorithms[0]
            return cls({"": BoundKey(alg, algorithms[alg].prepare_key(hs_secret(config)))})
        keys = {}
        for spec in config.public_keys or []:
            try:
                pem = spec.file.read_bytes()
                keys[spec.kid] = BoundKey(spec.alg, algorithms[spec.alg].prepare_key(pem))
            except (OSError, InvalidKeyError, ValueError) as exc:
                raise KeyConfigError(f"public key {spec.kid!r} ({spec.file}): {exc}") from None
        return cls(keys)

    async def key(self, kid: str | None, alg: str) -> BoundKey:
        if "" in self._keys:  # the one HMAC secret; a kid means nothing to it
            return check_alg(self._keys[""], alg)
        return check_alg(pick_key(self._keys, kid), alg)


def _jwk_alg(jwk: Mapping[str, Any], allowed: Sequence[str]) -> str | None:
    """The one allowed algorithm this JWK may verify, or None."""
    if "alg" in jwk:
        return str(jwk["alg"]) if jwk["alg"] in allowed else None
    kty = jwk.get("kty")
    if kty == "RSA":
        candidates = [a for a in allowed if a[:2] in ("RS", "PS")]
    elif kty == "EC":
        candidates = [a for a in allowed if a == _EC_CURVES.get(str(jwk.get("crv")))]
    elif kty == "OKP":
        candidates = [a for a in allowed if a == "EdDSA"]
    else:
        candidates = []
    # An RSA key with both RS256 and PS256 allowed is ambiguous: refuse to guess.
    return candidates[0] if len(candidates) == 1 else None


def keys_from_jwks(document: Any, allowed: Sequence[str]) -> dict[str, BoundKey]:
    """The usable signing keys of a JWKS document, by kid ("" when it has none)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, BoundKey] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        alg = _jwk_alg(jwk, allowed)
        if alg is None or alg.startswith("HS"):
            continue
        try:
            parsed = PyJWK(jwk, algorithm=alg)
        except (PyJWKError, InvalidKeyError, ValueError, TypeError):
            continue
        keys[str(jwk.get("kid", ""))] = BoundKey(alg, parsed.key)
    return keys
