"""JWT verification and JWKS handling against a real JWKS server."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.auth.jwks import JWKSKeys
from gateway.auth.jwt import JWTVerifier, mint
from gateway.auth.keys import InvalidToken, KeyConfigError, StaticKeys
from gateway.config.models import JWTConfig
from gateway.metrics import AuthMetrics
from tests.jwt_helpers import (
    AUDIENCE,
    ISSUER,
    RSA,
    SECRET,
    JWKSServer,
    KeyPair,
    claims,
    ec_key,
    ed_key,
    hs256_with_public_key,
    rsa_key,
    sign,
    sign_raw,
    unsigned,
)
from tests.waiting import eventually


def jwt_config(**over: Any) -> JWTConfig:
    base: dict[str, Any] = {
        "algorithms": ["RS256"],
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_url": "http://127.0.0.1:1/jwks.json",
        "leeway_s": 30,
    }
    base.update(over)
    return JWTConfig.model_validate({k: v for k, v in base.items() if v is not None})


@pytest.fixture
async def verifier(jwks: JWKSServer) -> AsyncIterator[JWTVerifier]:
    config = jwt_config(jwks_url=jwks.url)
    keys = JWKSKeys(jwks.url, config.algorithms, config.jwks_refresh_s)
    await keys.start()
    yield JWTVerifier(config, keys)
    await keys.stop()


def forged_tokens(jku_url: str) -> dict[str, str]:
    now = int(time.time())
    return {
        "alg none": unsigned(claims(), {"alg": "none", "typ": "JWT", "kid": RSA.kid}),
        "HS256 with the RS256 public key": hs256_with_public_key(RSA, claims()),
        "alg outside the allow-list": sign(RSA, claims(), alg="RS384"),
        "expired beyond leeway": sign(RSA, claims(exp=now - 31)),
        "nbf in the future": sign(RSA, claims(nbf=now + 120)),
        "missing exp": sign(RSA, claims(exp=None)),
        "issuer only partially matching": sign(RSA, claims(iss=ISSUER.rstrip("/"))),
        "issuer with a suffix": sign(RSA, claims(iss=ISSUER + "evil")),
        "wrong audience": sign(RSA, claims(aud="https://other.example.com")),
        "missing audience": sign(RSA, claims(aud=None)),
        "unknown kid": sign(rsa_key("rsa-unknown"), claims()),
        "crit header": sign_raw(RSA, claims(), {"alg": "RS256", "kid": RSA.kid, "crit": ["b64"]}),
        "jku header": sign(RSA, claims(), jku=jku_url),
        "jwk header": sign(RSA, claims(), jwk=RSA.jwk),
        "garbage": "not.a.jwt",
        "no tenant claim": sign(RSA, claims(org_id=None)),
    }


async def test_a_good_token_gives_the_tenant(verifier: JWTVerifier) -> None:
    payload = claims("acme")
    assert await verifier.verify(sign(RSA, payload)) == ("acme", float(payload["exp"]))
    # Within the leeway an expired token still passes.
    assert (await verifier.verify(sign(RSA, claims(exp=int(time.time()) - 10))))[0] == "acme"


async def test_forged_and_invalid_tokens_are_refused(
    verifier: JWTVerifier, jwks: JWKSServer
) -> None:
    jku_url = f"http://127.0.0.1:{jwks.port}/attacker/jwks.json"
    for case, token in forged_tokens(jku_url).items():
        with pytest.raises(InvalidToken):
            await verifier.verify(token)
            pytest.fail(f"accepted: {case}")
    assert jwks.hits == []  # the jku URL was never fetched


async def test_unknown_kid_flood_fetches_at_most_once(
    verifier: JWTVerifier, jwks: JWKSServer
) -> None:
    before = jwks.fetches
    rng = random.Random(7)

    async def attempt() -> None:
        forged = sign(RSA, claims(), kid=f"kid-{rng.getrandbits(64):x}")
        with pytest.raises(InvalidToken, match="key id is unknown"):
            await verifier.verify(forged)

    started = time.perf_counter()
    await asyncio.gather(*(attempt() for _ in range(1000)))
    elapsed = time.perf_counter() - started
    fetched = jwks.fetches - before
    print(f"\n1000 unknown kids in {elapsed:.1f}s -> {fetched} JWKS fetch(es)")
    assert fetched <= 1


async def test_rotated_key_is_fetched_once_and_kept_through_an_outage(
    verifier: JWTVerifier, jwks: JWKSServer
) -> None:
    new = rsa_key("rsa2")
    jwks.keys = [RSA.jwk, new.jwk]
    assert (await verifier.verify(sign(new, claims("beta"))))[0] == "beta"
    await jwks.stop()  # the identity provider goes down
    fresh = claims("gamma")
    assert (await verifier.verify(sign(new, fresh)))[0] == "gamma"
    assert (await verifier.verify(sign(RSA, claims("delta"))))[0] == "delta"


@pytest.mark.parametrize("make", [lambda: rsa_key("ps", "PS256"), ec_key, ed_key])
async def test_other_public_key_algorithms(make: Any, tmp_path: Path) -> None:
    key: KeyPair = make()
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.public_pem)
    config = jwt_config(
        algorithms=[key.alg],
        jwks_url=None,
        public_keys=[{"kid": key.kid, "file": str(pem), "alg": key.alg}],
    )
    verifier = JWTVerifier(config, StaticKeys.from_config(config))
    assert (await verifier.verify(sign(key, claims("acme"))))[0] == "acme"
    with pytest.raises(InvalidToken):
        await verifier.verify(sign(rsa_key(key.kid), claims(), alg="RS256"))


async def test_hs_secret_nested_tenant_claim_and_minting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_JWT_SECRET", SECRET)
    config = jwt_config(
        algorithms=["HS512"],
        jwks_url=None,
        secret_env="TEST_JWT_SECRET",
        tenant_claim=["https://example.com/claims", "org"],
        audience=None,
        issuer=None,
    )
    verifier = JWTVerifier(config, StaticKeys.from_config(config))
    token = mint(SECRET, "HS512", config.tenant_claim, "acme", 60)
    assert (await verifier.verify(token))[0] == "acme"
    other = mint("another-secret-" + "y" * 60, "HS512", config.tenant_claim, "acme", 60)
    with pytest.raises(InvalidToken):
        await verifier.verify(other)


def test_short_or_missing_hs_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_JWT_SECRET", "short")
    config = jwt_config(algorithms=["HS256"], jwks_url=None, secret_env="TEST_JWT_SECRET")
    with pytest.raises(KeyConfigError, match="at least 32 bytes"):
        StaticKeys.from_config(config)
    monkeypatch.delenv("TEST_JWT_SECRET")
    assert "TEST_JWT_SECRET" not in os.environ
    with pytest.raises(KeyConfigError):
        StaticKeys.from_config(config)


async def test_verified_tokens_are_cached_until_they_expire() -> None:
    now = [time.time()]
    config = jwt_config()
    calls = []

    class CountingKeys:
        async def key(self, kid: str | None, alg: str) -> Any:
            calls.append(kid)
            return await StaticKeys({RSA.kid: _bound(RSA)}).key(kid, alg)

    verifier = JWTVerifier(config, CountingKeys(), clock=lambda: now[0])
    token = sign(RSA, claims(exp=int(time.time()) + 600))
    for _ in range(3):
        await verifier.verify(token)
    assert len(calls) == 1
    now[0] += 601  # past exp by the verifier's clock: the cache entry is not used
    await verifier.verify(token)
    assert len(calls) == 2


def _bound(key: KeyPair) -> Any:
    from gateway.auth.keys import BoundKey

    return BoundKey(key.alg, key.private.public_key())


async def test_refetch_gap_bounds_how_long_a_forged_kid_delays_a_rotation(
    jwks: JWKSServer,
) -> None:
    # A fake clock: a slow machine (key generation, a loaded CI) must not let
    # the gap pass behind the test's back.
    now = [1000.0]
    config = jwt_config(jwks_url=jwks.url, jwks_refetch_min_s=0.2)
    keys = JWKSKeys(
        jwks.url, config.algorithms, 300, config.jwks_refetch_min_s, clock=lambda: now[0]
    )
    await keys.start()
    try:
        verifier = JWTVerifier(config, keys)
        with pytest.raises(InvalidToken):  # the attacker spends the refetch
            await verifier.verify(sign(RSA, claims(), kid="forged"))
        rotated = rsa_key("rsa-rotated")
        jwks.keys = [RSA.jwk, rotated.jwk]
        now[0] += 0.19
        with pytest.raises(InvalidToken):  # within the gap: not refetched yet
            await verifier.verify(sign(rotated, claims()))
        now[0] += 0.02
        assert (await verifier.verify(sign(rotated, claims("beta"))))[0] == "beta"
    finally:
        await keys.stop()


async def test_a_lookup_waits_for_the_miss_fetch_even_after_a_refresh_fetch_finished(
    jwks: JWKSServer,
) -> None:
    rotated = rsa_key("rsa-rotated")
    # The clock never moves: the second lookup falls within the refetch gap,
    # so only the fetch already in flight can give it the rotated key.
    config = jwt_config(jwks_url=jwks.url, jwks_refetch_min_s=60)
    refresh_s = 0.05  # the loop fetches while the test runs, not in five minutes
    keys = JWKSKeys(
        jwks.url, config.algorithms, refresh_s, config.jwks_refetch_min_s, clock=lambda: 1000.0
    )
    await keys.start()
    try:
        verifier = JWTVerifier(config, keys)
        jwks.stall = True
        await eventually(lambda: len(jwks.held) == 1)  # the refresh loop's fetch
        first = asyncio.create_task(verifier.verify(sign(rotated, claims("beta"))))
        await eventually(lambda: len(jwks.held) == 2)  # the unknown kid's fetch
        jwks.held[0].set()  # the refresh fetch ends, with the old keys...
        await eventually(lambda: len(jwks.held) == 3)  # ...for sure once the loop asks again
        # Created before the release, it looks the key up before the fetch can end.
        second = asyncio.create_task(verifier.verify(sign(rotated, claims("gamma"))))
        jwks.keys = [RSA.jwk, rotated.jwk]
        jwks.release_all()
        assert [(await first)[0], (await second)[0]] == ["beta", "gamma"]
    finally:
        await keys.stop()


async def test_jwks_fetches_are_counted_by_result(jwks: JWKSServer) -> None:
    registry = CollectorRegistry()
    config = jwt_config(jwks_url=jwks.url)
    keys = JWKSKeys(jwks.url, config.algorithms, 300, 0, metrics=AuthMetrics(registry))
    await keys.start()  # ok
    try:
        jwks.keys = []
        with pytest.raises(InvalidToken):
            await keys.key("unknown-1", "RS256")  # empty: the last good keys are kept
        await jwks.stop()
        with pytest.raises(InvalidToken):
            await keys.key("unknown-2", "RS256")  # error: the server is gone
    finally:
        await keys.stop()
    counts = {
        result: registry.get_sample_value("gateway_jwks_fetches_total", {"result": result})
        for result in ("ok", "empty", "error")
    }
    assert counts == {"ok": 1.0, "empty": 1.0, "error": 1.0}
    # Set by the one good fetch only: an alert sees how long the keys have been stale.
    last = registry.get_sample_value("gateway_jwks_last_success_timestamp_seconds")
    assert last is not None and 0 < time.time() - last < 60


async def test_the_token_cache_holds_as_many_tokens_as_configured() -> None:
    calls = []

    class CountingKeys:
        async def key(self, kid: str | None, alg: str) -> Any:
            calls.append(kid)
            return await StaticKeys({RSA.kid: _bound(RSA)}).key(kid, alg)

    verifier = JWTVerifier(jwt_config(cache_entries=3), CountingKeys())
    tokens = [sign(RSA, claims(f"tenant-{i}", exp=int(time.time()) + 600)) for i in range(4)]
    for token in tokens[:3] * 2:  # three tokens in rotation: verified once each
        await verifier.verify(token)
    assert len(calls) == 3
    for token in tokens:  # a fourth evicts the oldest, which is verified again
        await verifier.verify(token)
    await verifier.verify(tokens[0])
    assert len(calls) == 5


async def test_an_absurd_exp_and_an_altered_signature_get_our_own_401_text() -> None:
    verifier = JWTVerifier(jwt_config(), StaticKeys({RSA.kid: _bound(RSA)}))
    head, body, signature = sign(RSA, claims()).split(".")
    cases = {
        "exp of 10**400": sign(RSA, claims(exp=10**400)),
        "exp past the year 9999": sign(RSA, claims(exp=10**12)),
        "exp as a float beyond any date": sign(RSA, claims(exp=1e300)),
        "exp of infinity": sign(RSA, claims(exp=float("inf"))),
        "signature one character short": f"{head}.{body}.{signature[:-1]}",
        "signature not base64": f"{head}.{body}.{signature}!!",
        "signature of one character": f"{head}.{body}.a",
        "signature altered": f"{head}.{body}.{'A' * len(signature)}",
    }
    for case, token in cases.items():
        with pytest.raises(InvalidToken) as refused:
            await verifier.verify(token)
            pytest.fail(f"accepted: {case}")
        text = str(refused.value)
        assert text.startswith("the token"), (case, text)
        # Our sentences only: nothing of the JOSE library's own wording.
        for leaked in ("padding", "Invalid", "(", "Signature verification failed"):
            assert leaked not in text, (case, text)
