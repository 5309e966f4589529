"""Limits per client address: the unauthenticated request rate, floods of failed
authentications, and the table's bound."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from gateway.headers import TrustedProxies, client_key
from gateway.http.message import Request
from gateway.metrics import ProxyMetrics
from gateway.pipeline.client_limits import ClientLimits
from gateway.problems import Refused
from gateway.quota.gcra import RateLimit
from gateway.server import Gateway
from tests.conftest import MakeGateway, gateway_config
from tests.jwt_helpers import RSA, JWKSServer, claims, sign
from tests.test_auth_gateway import auth_config
from tests.upstream import Upstream

# The gateway believes 127.0.0.0/8's X-Forwarded-For: each test client is an address there.
BEHIND_PROXY = {"host": "127.0.0.1", "port": 0, "trusted_proxies": ["127.0.0.0/8"]}


async def get(gateway: Gateway, path: str, client: str, **headers: str) -> tuple[int, str | None]:
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{gateway.port}{path}"
        async with session.get(url, headers={"X-Forwarded-For": client, **headers}) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Retry-After")


def limited(gateway: Gateway, reason: str) -> float | None:
    return gateway.registry.get_sample_value("gateway_client_limited_total", {"reason": reason})


async def test_unauthenticated_requests_are_limited_per_client_address(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    limits = {"per_ip": {"rate": 1, "per_s": 60, "burst": 3}}
    gw = await make_gateway(gateway_config(upstream.url, server={**BEHIND_PROXY, "limits": limits}))
    answers = [await get(gw, "/open", "198.51.100.7") for _ in range(4)]
    assert [status for status, _ in answers] == [200, 200, 200, 429]
    assert answers[-1][1] == "60"  # one request a minute: its slot refills in 60 s
    assert await get(gw, "/open", "198.51.100.8") == (200, None)  # another client
    assert limited(gw, "per_ip") == 1
    assert len(upstream.seen) == 4


async def test_a_flood_of_failed_authentications_blocks_the_address_for_a_while(
    upstream: Upstream, jwks: JWKSServer, tmp_path: Path, make_gateway: MakeGateway
) -> None:
    config = auth_config(upstream, jwks, tmp_path)
    limits = {"failed_auth_per_ip": {"max_failures": 3, "per_s": 60, "block_s": 30}}
    config["server"] = {**BEHIND_PROXY, "limits": limits}
    gw = await make_gateway(config)
    bad = {"Authorization": "Bearer not-a-token"}
    good = {"Authorization": f"Bearer {sign(RSA, claims('acme'))}"}
    failures = [(await get(gw, "/v1/x", "198.51.100.7", **bad))[0] for _ in range(4)]
    assert failures == [401] * 4  # the fourth is one too many
    # Blocked: not even a good credential is verified from there, for block_s.
    assert await get(gw, "/v1/x", "198.51.100.7", **good) == (429, "30")
    assert await get(gw, "/v1/x", "198.51.100.8", **good) == (200, None)
    assert await get(gw, "/healthz", "198.51.100.7") == (200, None)  # auth: none goes on
    assert limited(gw, "failed_auth") == 1


def request_from(peer: str) -> Request:
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    return Request("GET", "/", (1, 1), headers, peer, "http", None, False, connection=None)  # type: ignore[arg-type]


def test_the_table_of_addresses_is_bounded_and_ipv6_counts_by_its_64() -> None:
    limits = ClientLimits(
        TrustedProxies([]), ProxyMetrics(CollectorRegistry()),
        rate=RateLimit("per_ip", 1, 60, 1), entries=100,
    )  # fmt: skip
    for n in range(1000):
        limits.unauthenticated(request_from(f"10.0.{n // 256}.{n % 256}"), now_us=0)
    assert limits.tracked == 100
    limits.unauthenticated(request_from("2001:db8:1:2::1"), now_us=0)
    try:
        limits.unauthenticated(request_from("2001:db8:1:2:ffff::9"), now_us=0)
    except Refused as refused:
        assert refused.status == 429
    else:
        raise AssertionError("another address of the same /64 was not limited")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("192.0.2.1") == "192.0.2.1"
