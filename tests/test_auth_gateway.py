"""Authentication, tenants and subscription gating through a running gateway."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.ledger.records import Tenant
from gateway.ledger.store import Ledger
from gateway.server import Gateway
from tests.conftest import MakeGateway, gateway_config
from tests.jwt_helpers import RSA, JWKSServer, claims, sign
from tests.test_jwt import forged_tokens
from tests.upstream import Upstream

ADMIN_TOKEN = "admin-" + "t" * 30
STATUSES = [
    "active", "trialing", "past_due", "unpaid", "canceled",
    "incomplete", "incomplete_expired", "paused",
]  # fmt: skip


def auth_config(upstream: Upstream, jwks: JWKSServer, tmp_path: Path) -> dict[str, Any]:
    return gateway_config(
        upstream.url,
        storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
        auth={
            "jwt": {
                "algorithms": ["RS256"],
                "issuer": "https://auth.example.com/",
                "audience": "https://api.example.com",
                "jwks_url": jwks.url,
                "jwks_refresh_s": 300,
            },
            "api_keys": {"enabled": True, "header": "X-API-Key"},
        },
        billing={"upgrade_url": "https://example.com/billing"},
        plans={"starter": {}, "pro": {"upgrade_url": "https://example.com/billing/pro"}},
        subscription={"allow": ["active", "trialing"], "grace": {"past_due": "3d"}},
        tenants=[{"id": "acme", "plan": "starter"}],
        routes=[
            {"name": "health", "match": {"path": "/healthz"}, "upstream": "app", "auth": "none"},
            {"name": "api", "match": {"path": "/**"}, "upstream": "app", "cors": True},
        ],
    )


@pytest.fixture
async def gateway(
    upstream: Upstream,
    jwks: JWKSServer,
    tmp_path: Path,
    make_gateway: MakeGateway,
    monkeypatch: pytest.MonkeyPatch,
) -> Gateway:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    return await make_gateway(auth_config(upstream, jwks, tmp_path))


async def call(
    gw: Gateway, path: str = "/v1/things", token: str | None = None, **headers: str
) -> tuple[int, dict[str, str], Any]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{gw.port}{path}", headers=headers) as resp:
            body = await resp.json(content_type=None)
            return resp.status, dict(resp.headers), body


async def admin(gw: Gateway, method: str, path: str, json: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as client:
        async with client.request(
            method,
            f"http://127.0.0.1:{gw.admin_port}{path}",
            json=json,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_forged_tokens_are_401_and_never_reach_the_upstream(
    gateway: Gateway, upstream: Upstream, jwks: JWKSServer
) -> None:
    jku = f"http://127.0.0.1:{jwks.port}/attacker/jwks.json"
    for case, token in forged_tokens(jku).items():
        status, headers, body = await call(gateway, token=token)
        assert status == 401, case
        assert headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
        assert body["type"].endswith(":unauthenticated")
    for sent in ({"Authorization": "Bearer "}, {}, {"Authorization": "Basic dXNlcjpwdw=="}):
        status, headers, _ = await call(gateway, **sent)
        assert status == 401, sent
        assert headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert upstream.seen == []
    assert jwks.hits == []  # the jku header was never followed


async def test_a_valid_token_is_forwarded_as_its_tenant(
    gateway: Gateway, upstream: Upstream
) -> None:
    token = sign(RSA, claims("acme"))
    status, headers, _ = await call(gateway, token=token, **{"X-Tenant-Id": "someone-else"})
    assert status == 200
    assert "X-Quota-Warning" not in headers
    seen = upstream.seen[-1]
    assert seen.all("X-Tenant-Id") == ["acme"]
    assert seen.header("Authorization") == f"Bearer {token}"
    assert (await call(gateway, "/healthz"))[0] == 200  # auth: none needs nothing


async def test_unknown_kid_flood_and_jwks_outage(
    gateway: Gateway, jwks: JWKSServer, upstream: Upstream
) -> None:
    before = jwks.fetches
    rng = random.Random(3)
    semaphore = asyncio.Semaphore(50)

    async with aiohttp.ClientSession() as client:

        async def forged() -> int:
            token = sign(RSA, claims(), kid=f"k{rng.getrandbits(64):x}")
            async with semaphore:
                url = f"http://127.0.0.1:{gateway.port}/v1/x"
                async with client.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
                    return r.status

        statuses = await asyncio.gather(*(forged() for _ in range(1000)))
    fetched = jwks.fetches - before
    print(f"\n1000 requests with unknown kids -> {fetched} JWKS fetch(es)")
    assert set(statuses) == {401}
    assert fetched <= 1
    await jwks.stop()
    status, _, _ = await call(gateway, token=sign(RSA, claims("acme", jti="after-outage")))
    assert status == 200
    assert len(upstream.seen) == 1


@pytest.mark.parametrize("status", [*STATUSES, "past_due after grace"])
async def test_subscription_status_matrix(gateway: Gateway, tmp_path: Path, status: str) -> None:
    changed = datetime.now(UTC)
    if status == "past_due after grace":
        status, changed = "past_due", changed - timedelta(days=3, seconds=1)
    ledger = await Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    await ledger.put_tenant(Tenant(id="t1", plan="pro", status=status, status_changed_at=changed))
    await ledger.close()
    code, headers, body = await call(gateway, token=sign(RSA, claims("t1")))
    in_grace = status == "past_due" and changed > datetime.now(UTC) - timedelta(days=3)
    if status in ("active", "trialing"):
        assert (code, headers.get("X-Quota-Warning")) == (200, None)
    elif in_grace:
        ends = (changed + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert code == 200
        assert headers["X-Quota-Warning"] == f"subscription past_due, grace ends {ends}"
    else:
        assert code == 402
        assert body["type"].endswith(":subscription-inactive")
        assert body["tenant"] == "t1" and body["plan"] == "pro"
        assert body["upgrade_url"] == "https://example.com/billing/pro"
        assert status in body["detail"]


async def test_unknown_disabled_and_reenabled_tenants(gateway: Gateway) -> None:
    code, _, body = await call(gateway, token=sign(RSA, claims("nobody")))
    assert (code, body["type"].rsplit(":", 1)[1]) == (403, "tenant-unknown")
    assert (await admin(gateway, "DELETE", "/admin/tenants/acme"))[0] == 200
    code, _, body = await call(gateway, token=sign(RSA, claims("acme")))
    assert (code, body["type"].rsplit(":", 1)[1]) == (403, "tenant-disabled")
    status, tenant = await admin(gateway, "PUT", "/admin/tenants/acme", {"disabled": False})
    assert (status, tenant["disabled"], tenant["plan"]) == (200, False, "starter")
    assert (await call(gateway, token=sign(RSA, claims("acme"))))[0] == 200


async def test_api_keys_are_created_used_and_revoked(gateway: Gateway, upstream: Upstream) -> None:
    status, created = await admin(gateway, "POST", "/admin/tenants/acme/api-keys", {"name": "ci"})
    assert status == 201
    key = created["key"]
    assert (await call(gateway, **{"X-API-Key": key}))[0] == 200
    assert upstream.seen[-1].header("X-API-Key") is None  # the gateway's secret stays here
    assert upstream.seen[-1].header("X-Tenant-Id") == "acme"
    _, listed = await admin(gateway, "GET", "/admin/tenants/acme/api-keys")
    assert [k["prefix"] for k in listed["api_keys"]] == [created["prefix"]]
    assert "key" not in listed["api_keys"][0]
    assert (await admin(gateway, "DELETE", f"/admin/api-keys/{created['prefix']}"))[0] == 200
    status, headers, _ = await call(gateway, **{"X-API-Key": key})
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    assert (await call(gateway, **{"X-API-Key": key[:-1] + "x"}))[0] == 401
    assert (await call(gateway, **{"X-API-Key": "gk_not_a_key"}))[0] == 401
    assert (await admin(gateway, "DELETE", f"/admin/api-keys/{created['prefix']}"))[0] == 404


async def test_cors_preflight_is_forwarded_without_credentials(
    gateway: Gateway, upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.options(
            f"http://127.0.0.1:{gateway.port}/v1/things",
            headers={
                "Origin": "https://app.example.com",
                "Access-Control-Request-Method": "POST",
                "Authorization": "Bearer whatever",
                "X-API-Key": "gk_whatever",
            },
        ) as resp:
            assert resp.status == 200
    seen = upstream.seen[-1]
    assert seen.method == "OPTIONS"
    assert seen.header("Authorization") is None and seen.header("X-API-Key") is None
    assert seen.header("X-Tenant-Id") is None
    assert seen.header("Origin") == "https://app.example.com"


async def test_admin_api_validation_and_openapi(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{gateway.admin_port}/admin/tenants"
        async with client.get(url) as resp:
            assert resp.status == 401
        async with client.get(url, headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
    status, body = await admin(gateway, "PUT", "/admin/tenants/new", {"plan": "gold"})
    assert (status, body["detail"]) == (422, "plan: unknown plan 'gold' (defined: pro, starter)")
    status, body = await admin(gateway, "PUT", "/admin/tenants/new", {"status": "active"})
    assert (status, body["detail"]) == (422, "plan: required for a new tenant")
    status, body = await admin(gateway, "PUT", "/admin/tenants/new", {"plan": "pro", "x": 1})
    assert (status, body["detail"]) == (422, "x: Extra inputs are not permitted")
    status, body = await admin(gateway, "PUT", "/admin/tenants/new", {"plan": "pro"})
    assert (status, body["status"]) == (201, "active")
    status, page = await admin(gateway, "GET", "/admin/tenants?limit=1")
    assert (status, [t["id"] for t in page["tenants"]], page["next"]) == (200, ["acme"], "acme")
    _, rest = await admin(gateway, "GET", "/admin/tenants?after=acme")
    assert [t["id"] for t in rest["tenants"]] == ["new"]
    for bad in ("0", "1001", "x"):  # a 400 that says why, never a 500 or a clamp
        status, body = await admin(gateway, "GET", f"/admin/tenants?limit={bad}")
        assert (status, body["detail"]) == (400, "limit must be an integer from 1 to 1000")
    status, body = await admin(gateway, "GET", "/admin/tenants/ghost")
    assert (status, body["type"].rsplit(":", 1)[1]) == (404, "tenant-unknown")
    assert body["request_id"]
    status, spec = await admin(gateway, "GET", "/admin/openapi.json")
    assert status == 200 and spec["openapi"] == "3.1.0"
    assert {"/admin/tenants", "/admin/tenants/{id}", "/admin/api-keys/{prefix}"} <= set(
        spec["paths"]
    )


async def test_status_change_restarts_the_grace_clock(gateway: Gateway) -> None:
    before = datetime.now(UTC)
    _, tenant = await admin(gateway, "PUT", "/admin/tenants/acme", {"status": "past_due"})
    changed = datetime.fromisoformat(tenant["status_changed_at"])
    assert changed >= before
    code, headers, _ = await call(gateway, token=sign(RSA, claims("acme")))
    assert code == 200 and headers["X-Quota-Warning"].startswith("subscription past_due")
    _, again = await admin(gateway, "PUT", "/admin/tenants/acme", {"name": "Acme"})
    assert again["status_changed_at"] == tenant["status_changed_at"]  # same status: kept


async def test_path_tricks_cannot_reach_a_protected_route_unauthenticated(
    upstream: Upstream, jwks: JWKSServer, tmp_path: Path, make_gateway: MakeGateway
) -> None:
    config = auth_config(upstream, jwks, tmp_path)
    config["routes"] = [
        {"name": "admin", "match": {"path": "/v1/admin/users"}, "upstream": "app"},
        {"name": "user", "match": {"path": "/v1/users/{id}", "methods": ["GET"]},
         "upstream": "app", "auth": "none"},
        {"name": "private", "match": {"path": "/v1/**"}, "upstream": "app"},
        {"name": "public", "match": {"path": "/**"}, "upstream": "app", "auth": "none"},
    ]  # fmt: skip
    gw = await make_gateway(config)
    for target in (
        "/v1/admin/users#",
        "/v1/admin/users#x/y",
        "/v1/users/42%2Fbilling",  # WSGI upstreams decode it to /v1/users/42/billing
        "/v1/users/x%2F..%2F..%2Fadmin%2Fusers",
        "/v1/users/..;/admin/users",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        status_line = (await reader.readline()).decode()
        writer.close()
        assert status_line.split()[1] == "400", (target, status_line)
    assert upstream.seen == []


async def test_admin_inputs_that_used_to_fail_with_500(gateway: Gateway) -> None:
    status, body = await admin(
        gateway, "PUT", "/admin/tenants/acme", {"billing_anchor": "2026-01-31T10:00:00"}
    )
    assert status == 422 and body["detail"].startswith("billing_anchor:")
    status, tenant = await admin(
        gateway, "PUT", "/admin/tenants/acme", {"billing_anchor": "2026-01-31T10:00:00Z"}
    )
    assert (status, tenant["billing_anchor"]) == (200, "2026-01-31T10:00:00Z")
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{gateway.admin_port}/admin/tenants"
        async with client.get(url, headers={"Authorization": "Bearer caf\u00e9"}) as resp:
            assert resp.status == 401


async def test_a_refused_upload_gets_no_100_continue_and_is_not_read(
    gateway: Gateway, upstream: Upstream
) -> None:
    """`Expect: 100-continue` is answered only once the request is admitted: a
    401 goes out instead, and the connection closes rather than take the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"POST /v1/things HTTP/1.1\r\nHost: api.test\r\nContent-Length: 1073741824\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # returns at the close
    writer.close()
    assert data.startswith(b"HTTP/1.1 401 ")
    assert b"100 Continue" not in data
    assert b"Connection: close" in data.partition(b"\r\n\r\n")[0]
    assert upstream.seen == []
