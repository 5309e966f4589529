"""JWT verification: allow-listed algorithms, bound keys, strict claims, a cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt as pyjwt

from gateway.auth.keys import InvalidToken, KeySource
from gateway.config.models import JWTConfig

# Headers that tell a verifier where to fetch or find a key. Following them
# lets the token's author choose the key that verifies it.
_KEY_LOCATING_HEADERS = ("jku", "x5u", "jwk", "x5c")
# 9999-12-31T23:59:59Z: a later `exp` is no date at all (10**400 does not even fit a float).
MAX_EXP_S = 253_402_300_799


def tenant_from_claims(claims: dict[str, Any], path: list[str]) -> str:
    """The tenant id at `path` (one claim name, or a path into nested objects)."""
    value: Any = claims
    for part in path:
        if not isinstance(value, dict) or part not in value:
            raise InvalidToken(f"the token has no {'.'.join(path)} claim")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise InvalidToken(f"the token's {'.'.join(path)} claim is not a tenant id")
    return str(value)


class JWTVerifier:
    """Verifies bearer tokens and returns (tenant id, expiry)."""

    def __init__(
        self, config: JWTConfig, keys: KeySource, clock: Callable[[], float] = time.time
    ) -> None:
        self._config = config
        self._keys = keys
        self._clock = clock
        self._allowed = frozenset(config.algorithms)
        self._required = (
            ["exp"] + (["iss"] if config.issuer else []) + (["aud"] if config.audience else [])
        )
        # token -> (tenant, exp): a token verified once is not verified again
        # until it expires; insertion order gives a cheap oldest-first eviction.
        self._cache: dict[str, tuple[str, float]] = {}

    async def verify(self, token: str) -> tuple[str, float]:
        """(tenant id, exp) of a valid token; raises InvalidToken."""
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            if cached[1] > now:
                return cached
            del self._cache[token]
        tenant, exp = await self._verify(token)
        if len(self._cache) >= self._config.cache_entries:
            del self._cache[next(iter(self._cache))]
        self._cache[token] = (tenant, exp)
        return tenant, exp

    async def _verify(self, token: str) -> tuple[str, float]:
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.InvalidTokenError:  # malformed, or PyJWT's own header checks
            # Our own words: the library's text describes its internals, not the token.
            raise InvalidToken("the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise InvalidToken(f"the token's algorithm {alg!r} is not allowed")
        if "crit" in header:
            raise InvalidToken("the token has critical header extensions (crit)")
        for name in _KEY_LOCATING_HEADERS:
            if name in header:
                raise InvalidToken(f"the token's {name!r} header is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("the token's key id is not a string")
        bound = await self._keys.key(kid, alg)
        config = self._config
        try:
            claims: dict[str, Any] = pyjwt.decode(
                token,
                bound.key,
                algorithms=[bound.alg],
                audience=config.audience,
                leeway=config.leeway_s,
                options={
                    "require": self._required,
                    "verify_aud": config.audience is not None,
                    "verify_iss": False,  # compared exactly below
                },
            )
        except pyjwt.ExpiredSignatureError:
            raise InvalidToken("the token has expired") from None
        except pyjwt.ImmatureSignatureError:
            raise InvalidToken("the token is not valid yet") from None
        except pyjwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the token has no {exc.claim!r} claim") from None
        except pyjwt.InvalidAudienceError:
            raise InvalidToken("the token is for another audience") from None
        except pyjwt.InvalidTokenError:
            raise InvalidToken("the token's signature or claims are invalid") from None
        if config.issuer is not None and claims.get("iss") != config.issuer:
            raise InvalidToken("the token is from another issuer")
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise InvalidToken("the token's exp claim is not a number")
        if not exp <= MAX_EXP_S:  # NaN fails this too
            raise InvalidToken("the token's exp claim is not a date")
        return tenant_from_claims(claims, config.tenant_claim), float(exp)


def mint(
    secret: str, alg: str, tenant_claim: list[str], tenant: str, ttl_s: float, **claims: Any
) -> str:
    """A token signed with an HS secret (for `gateway token` and the demo)."""
    now = int(time.time())
    payload: dict[str, Any] = {"iat": now, "exp": now + int(ttl_s), **claims}
    target = payload
    for part in tenant_claim[:-1]:
        target = target.setdefault(part, {})
    target[tenant_claim[-1]] = tenant
    return pyjwt.encode(payload, secret, algorithm=alg)
