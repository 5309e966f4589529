"""Hostile requests: what must never reach the upstream, and the gateway's own answers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.auth.jwt import mint
from gateway.config.types import MAX_QUANTITY
from gateway.headers import CLIENT_IP_HEADERS, OVERRIDE_HEADERS
from gateway.openapi import openapi_document
from gateway.pipeline.idempotency import SPOOL_MEMORY_BYTES
from gateway.server import Gateway
from tests.conftest import MakeGateway, gateway_config
from tests.jwt_helpers import RSA, JWKSServer, claims, sign, unsigned
from tests.test_auth_gateway import ADMIN_TOKEN, admin, auth_config
from tests.test_quota_gateway import SECRET, quota_config
from tests.upstream import Upstream

# Every header of the documented lists, as a client or a scanner sends it.
HOSTILE = {
    "X-Original-URL": "/admin",
    "X-Original-URI": "/admin",
    "X-Rewrite-URL": "/admin",
    "X-Override-URL": "/admin",
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
    "X-Forwarded-Prefix": "/admin",
    "X-Forwarded-Port": "8443",
    "X-Forwarded-Server": "evil.test",
    "X-Forwarded-Scheme": "https",
    "X-Forwarded-Ssl": "on",
    "X-Forwarded-Path": "/admin",
    "X-Forwarded-Uri": "/admin",
    "X-Real-IP": "203.0.113.9",
    "True-Client-IP": "203.0.113.9",
    "CF-Connecting-IP": "203.0.113.9",
    "Fastly-Client-IP": "203.0.113.9",
    "X-Client-IP": "203.0.113.9",
    "X-Cluster-Client-IP": "203.0.113.9",
    "X-Originating-IP": "203.0.113.9",
    "X_Real_IP": "203.0.113.9",  # the underscore spelling CGI servers fold into X-Real-IP
    "Forwarded": "for=203.0.113.9;host=evil.test",
}


def test_the_lists_name_every_header_of_the_issue() -> None:
    listed = {name.lower() for name in (*OVERRIDE_HEADERS, *CLIENT_IP_HEADERS)}
    wanted = {name.lower().replace("_", "-") for name in HOSTILE} - {"forwarded"}
    assert wanted <= listed


@pytest.mark.parametrize("trusted", [[], ["127.0.0.0/8"]], ids=["direct", "behind-trusted-proxy"])
async def test_override_and_client_ip_headers_never_reach_the_upstream(
    upstream: Upstream, make_gateway: MakeGateway, trusted: list[str]
) -> None:
    server = {"host": "127.0.0.1", "port": 0, "trusted_proxies": trusted}
    gw = await make_gateway(gateway_config(upstream.url, server=server))
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{gw.port}/v1/things?x=1"
        async with client.get(url, headers=HOSTILE) as resp:
            assert resp.status == 200
    seen = upstream.seen[-1]
    assert (seen.method, seen.raw_path) == ("GET", "/v1/things?x=1")
    leaked = {
        k for k, _ in seen.headers if k.lower().replace("_", "-") in {h.lower() for h in HOSTILE}
    }
    # A trusted proxy's `Forwarded` is believed, as its X-Forwarded-For is.
    assert leaked == ({"Forwarded"} if trusted else set())
    assert seen.header("X-Forwarded-For") == "127.0.0.1"


async def exchange(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request written exactly as given (lines joined by CRLF), on its own connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = head.strip("\n").split("\n")
    writer.write("\r\n".join([*lines, "Connection: close", "", ""]).encode("latin-1") + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    status_line, *fields = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    return int(status_line.split()[1]), headers, rest


def alg_none(tenant: str = "acme") -> str:
    return unsigned(claims(tenant), {"alg": "none", "typ": "JWT", "kid": RSA.kid})


@pytest.fixture
async def authed(
    upstream: Upstream,
    jwks: JWKSServer,
    tmp_path: Path,
    make_gateway: MakeGateway,
    monkeypatch: pytest.MonkeyPatch,
) -> Gateway:
    """JWT and API keys in front of three upstreams: the default (verified credentials
    only), `always` (the client's Authorization as sent) and `never`."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    config = auth_config(upstream, jwks, tmp_path)
    config["upstreams"] = {
        "app": {"url": upstream.url},
        "own-auth": {"url": upstream.url, "forward_authorization": "always"},
        "private": {"url": upstream.url, "forward_authorization": "never"},
    }
    config["routes"] = [
        {"name": "open", "match": {"path": "/open/**"}, "upstream": "app", "auth": "none"},
        {"name": "login", "match": {"path": "/login/**"}, "upstream": "own-auth", "auth": "none"},
        {"name": "private", "match": {"path": "/private/**"}, "upstream": "private"},
        {"name": "api", "match": {"path": "/**"}, "upstream": "app"},
    ]
    return await make_gateway(config)


async def test_only_a_verified_authorization_reaches_the_upstream(
    authed: Gateway, upstream: Upstream
) -> None:
    _, created = await admin(authed, "POST", "/admin/tenants/acme/api-keys")
    key, token = created["key"], sign(RSA, claims("acme"))

    async def forwarded(path: str, *fields: str) -> str | None:
        """The Authorization the upstream received for GET `path` with `fields`."""
        head = "\n".join([f"GET {path} HTTP/1.1", "Host: t", *fields])
        assert (await exchange(authed.port, head))[0] == 200
        seen = upstream.seen[-1]
        assert seen.raw_path == path and seen.header("X-API-Key") is None
        assert len(seen.all("Authorization")) <= 1
        return seen.header("Authorization")

    # An API key authenticates: the forged token beside it is not forwarded.
    assert (
        await forwarded("/v1/a", f"X-API-Key: {key}", f"Authorization: Bearer {alg_none()}") is None
    )
    assert upstream.seen[-1].header("X-Tenant-Id") == "acme"
    # The token the gateway verified is forwarded, as it came.
    assert await forwarded("/v1/b", f"Authorization: Bearer {token}") == f"Bearer {token}"
    # `never`: not even a verified one.
    assert await forwarded("/private/c", f"Authorization: Bearer {token}") is None
    # `auth: none` verifies nothing, so forwards no Authorization, unless `always`.
    assert await forwarded("/open/d", "Authorization: Basic dTpw") is None
    assert await forwarded("/login/e", "Authorization: Basic dTpw") == "Basic dTpw"


async def test_two_authorization_headers_are_refused(authed: Gateway, upstream: Upstream) -> None:
    token = sign(RSA, claims("acme"))
    _, created = await admin(authed, "POST", "/admin/tenants/acme/api-keys")
    for first, second in ((token, alg_none()), (alg_none(), token), (token, token)):
        head = (
            f"GET /v1/x HTTP/1.1\nHost: t\nAuthorization: Bearer {first}\n"
            f"Authorization: Bearer {second}"
        )
        status, headers, body = await exchange(authed.port, head)
        assert status == 400, (first, second)
        assert headers["content-type"] == "application/problem+json"
        assert json.loads(body)["type"].endswith(":ambiguous-credentials")
    # With an API key too, and with two API keys.
    key = created["key"]
    for extra in (f"Authorization: Bearer {token}\nAuthorization: Bearer {token}",
                  f"X-API-Key: {key}"):  # fmt: skip
        head = f"GET /v1/x HTTP/1.1\nHost: t\nX-API-Key: {key}\n{extra}"
        assert (await exchange(authed.port, head))[0] == 400, extra
    assert upstream.seen == []


PREFLIGHT = (
    "OPTIONS {path} HTTP/1.1\nHost: t\nOrigin: https://app.example.com\n"
    "Access-Control-Request-Method: POST\nAuthorization: Bearer {token}\nX-API-Key: gk_x\n"
    "Content-Length: 6"
)


async def test_preflights_go_on_bare_uncharged_and_only_where_the_route_allows_cors(
    upstream: Upstream,
    jwks: JWKSServer,
    tmp_path: Path,
    make_gateway: MakeGateway,
) -> None:
    config = auth_config(upstream, jwks, tmp_path)
    config["meters"] = {"api_calls": {"type": "counter", "period": "month"}}
    config["plans"] = {"starter": {"limits": {"api_calls": {"limit": 1}}}}
    charge = {"api_calls": 1}
    config["routes"] = [
        {"name": "cors", "match": {"path": "/cors/**"}, "upstream": "app", "cors": True,
         "charge": charge},
        {"name": "open", "match": {"path": "/open/**"}, "upstream": "app", "auth": "none"},
        {"name": "api", "match": {"path": "/**"}, "upstream": "app", "charge": charge},
    ]  # fmt: skip
    gw = await make_gateway(config)
    token = sign(RSA, claims("acme"))
    for path in ("/cors/a", "/cors/b", "/open/c"):
        status, _, _ = await exchange(gw.port, PREFLIGHT.format(path=path, token=token), b"secret")
        assert status == 200, path
        seen = upstream.seen[-1]
        assert (seen.method, seen.raw_path, seen.body) == ("OPTIONS", path, b"")
        for name in ("Authorization", "X-API-Key", "X-Tenant-Id"):
            assert seen.header(name) is None, (path, name)
        assert seen.header("Origin") == "https://app.example.com"
    # A route without `cors: true` forwards no preflight, credentials or not.
    status, headers, body = await exchange(
        gw.port, PREFLIGHT.format(path="/v1/x", token=token), b"secret"
    )
    assert status == 403 and json.loads(body)["type"].endswith(":cors-not-allowed")
    assert len(upstream.seen) == 3
    # Nothing was charged: the quota of 1 is still whole.
    head = f"GET /cors/d HTTP/1.1\nHost: t\nAuthorization: Bearer {token}"
    assert (await exchange(gw.port, head))[0] == 200
    assert (await exchange(gw.port, head))[0] == 402


async def test_the_gateways_own_answers_are_problems_with_a_request_id_and_no_server(
    authed: Gateway,
) -> None:
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    admin_base = f"http://127.0.0.1:{authed.admin_port}"
    public_base = f"http://127.0.0.1:{authed.port}"
    cases: list[tuple[str, str, dict[str, str], int]] = [
        ("GET", f"{admin_base}/admin/nothing-here", bearer, 404),
        ("POST", f"{admin_base}/admin/tenants", bearer, 405),
        ("POST", f"{admin_base}/healthz", {}, 405),
        ("GET", f"{admin_base}/nothing-here", {}, 404),
        ("GET", f"{admin_base}/admin/tenants", {}, 401),
        ("GET", f"{admin_base}/admin/tenants/ghost", bearer, 404),
        ("GET", f"{admin_base}/admin/tenants", bearer, 200),
        ("GET", f"{admin_base}/healthz", {}, 200),
        ("GET", f"{admin_base}/metrics", {}, 200),
        ("GET", f"{public_base}/_gateway/nothing-here", {}, 404),
        ("GET", f"{public_base}/_gateway/usage", {}, 404),  # no quotas here
        ("POST", f"{public_base}/_gateway/usage", {"X-Request-Id": "mine-1"}, 404),
    ]
    async with aiohttp.ClientSession() as client:
        for method, url, headers, expected in cases:
            async with client.request(method, url, headers=headers) as resp:
                case = (method, url, headers)
                assert resp.status == expected, case
                assert "Server" not in resp.headers, case
                rid = resp.headers.get("X-Request-Id")
                assert rid and rid == headers.get("X-Request-Id", rid), case
                if expected >= 400:
                    assert resp.content_type == "application/problem+json", case
                    problem = await resp.json(content_type=None)
                    assert (problem["status"], problem["request_id"]) == (expected, rid), case
                if expected == 405:
                    assert resp.headers["Allow"], case


async def test_an_idempotent_upload_passes_in_bounded_memory(
    upstream: Upstream, tmp_path: Path, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 MB with an Idempotency-Key: hashed as it streams, spooled past a bound, never
    held whole (the gateway, the upstream and this client share the process)."""
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    config = quota_config(upstream, tmp_path)
    upload = {"name": "upload", "match": {"path": "/upload"}, "upstream": "app",
              "charge": {"api_calls": 1}, "max_body_bytes": 64 * 1024 * 1024}  # fmt: skip
    config["routes"] = [upload, *config["routes"]]
    gw = await make_gateway(config)
    token = mint(SECRET, "HS256", ["org_id"], "acme", 600)
    block, blocks = bytes(range(256)) * 256, 800  # 64 KiB x 800: 50 MiB (52 MB)
    digest = hashlib.sha256(block * blocks).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(blocks):
            yield block

    async def post(data: AsyncIterator[bytes] | bytes) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "upload-1"}
        if isinstance(data, bytes):
            headers["Content-Length"] = str(len(data))
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{gw.port}/upload"
            async with client.post(url, data=data, headers=headers) as resp:
                return resp.status, await resp.json(content_type=None)

    tracemalloc.start()
    try:
        status, answer = await post(body())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (status, answer) == (200, {"body_bytes": 256 * 256 * blocks, "body_sha256": digest})
    print(f"50 MiB idempotent upload: peak traced memory {peak / 2**20:.1f} MiB")
    assert peak < SPOOL_MEMORY_BYTES + 4 * 2**20, peak  # it was twice the body, and more
    # The stored fingerprint covers the whole body: another payload is 422.
    assert (await post(b"other"))[0] == 422
    assert upstream.seen[-1].body_bytes == 256 * 256 * blocks and len(upstream.seen) == 1


async def raw_status(port: int, head: bytes) -> int:
    """The status of one request whose head is written byte for byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Connection: close\r\n\r\n")
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return int(status_line.split()[1])


@pytest.fixture
async def metered(
    upstream: Upstream, tmp_path: Path, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> Gateway:
    """Quotas (a counter, a gauge), JWT and API keys, the admin API."""
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    config = quota_config(upstream, tmp_path)
    config["auth"]["api_keys"] = {"enabled": True}
    return await make_gateway(config)


async def test_admin_numbers_beyond_the_stores_and_odd_input_are_4xx(
    metered: Gateway, upstream: Upstream
) -> None:
    def kind(body: Any) -> str:
        return str(body["type"]).rsplit(":", 1)[1]

    gauge = "/admin/tenants/acme/gauges/team_members"
    for value in (2**63, 2**53, -1, 10**15 + 1):
        status, body = await admin(metered, "PUT", gauge, {"value": value})
        assert status in (400, 422) and status != 500, value
    assert (await admin(metered, "PUT", gauge, {"value": 10**15}))[0] == 200
    assert (await admin(metered, "PUT", gauge, {"value": 2**63}))[0] == 400
    for quantity in (10**23, -(10**23), 10**15 + 1):
        status, body = await admin(
            metered,
            "POST",
            "/admin/tenants/acme/credits",
            {"meter": "api_calls", "quantity": quantity},
        )
        assert (status, kind(body)) == (400, "out-of-range"), quantity
    for limit in ("0", "-1", str(-(10**30)), "9" * 5000, "1e3", ""):
        status, body = await admin(metered, "GET", f"/admin/tenants?limit={limit}")
        assert (status, kind(body)) == (400, "bad-query"), limit
    hourly = "/admin/tenants/acme/usage/api_calls/hourly"
    for query in (
        "since=0001-01-01T00:00:00Z&until=0001-01-02T00:00:00Z",
        "until=0001-01-01T00:00:00Z",
        "since=0001-01-01T00:30:00%2B01:00",
        "since=9999-12-31T00:00:00Z&until=9999-12-31T23:59:59Z",
        "since=9999-12-31T23:00:00-14:00",
        "since=1969-12-31T00:00:00Z&until=1970-01-01T00:00:00Z",
    ):
        status, body = await admin(metered, "GET", f"{hourly}?{query}")
        assert (status, kind(body)) == (400, "bad-query"), query
    override = {"overrides": {"api_calls": {"limit": 10**23}}}
    assert (await admin(metered, "PUT", "/admin/tenants/acme", override))[0] == 422
    # A body that is JSON but not an object creates nothing.
    for body in ([], ["name"], "x", 5, False):
        status, _ = await admin(metered, "POST", "/admin/tenants/acme/api-keys", body)
        assert status == 422, body
    assert (await admin(metered, "GET", "/admin/tenants/acme/api-keys"))[1]["api_keys"] == []
    # Bytes that are not UTF-8 where a credential or key goes: 401 or 400, never 500.
    admin_head = b"GET /admin/tenants HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xff\xfe\r\n"
    assert await raw_status(metered.admin_port, admin_head) == 401
    token = mint(SECRET, "HS256", ["org_id"], "acme", 600).encode()
    for field, expected in (
        (b"Authorization: Bearer \xff\xfe" + token, 401),
        (b"Authorization: Bearer " + token[:-2] + b"\xc3\xa9", 401),
        (b"X-API-Key: gk_\xff", 401),
        (b"Authorization: Bearer " + token + b"\r\nIdempotency-Key: k\xff\xfe", 400),
        (b"Authorization: Bearer " + token + b"\r\nIdempotency-Key: caf\xc3\xa9", 400),
    ):
        head = b"POST /v1/things HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n" + field + b"\r\n"
        assert await raw_status(metered.port, head) == expected, field
    assert upstream.seen == []


def test_the_openapi_document_states_the_refusals_and_the_bounds() -> None:
    spec = openapi_document()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            answers = set(operation["responses"])
            assert {"401", "403"} <= answers, (method, path)
            if "requestBody" in operation:
                assert {"400", "422"} <= answers, (method, path)
    gauge = spec["paths"]["/admin/tenants/{id}/gauges/{meter}"]["put"]
    value = gauge["requestBody"]["content"]["application/json"]["schema"]["properties"]["value"]
    assert (value["minimum"], value["maximum"]) == (0, MAX_QUANTITY)
    credit = spec["paths"]["/admin/tenants/{id}/credits"]["post"]
    quantity = credit["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert (quantity["quantity"]["minimum"], quantity["quantity"]["maximum"]) == (
        -MAX_QUANTITY, MAX_QUANTITY
    )  # fmt: skip
    hourly = spec["paths"]["/admin/tenants/{id}/usage/{meter}/hourly"]["get"]
    assert (
        "400" in hourly["responses"]
        and "400" in spec["paths"]["/admin/tenants"]["get"]["responses"]
    )
