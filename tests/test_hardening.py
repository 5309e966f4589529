"""Hostile requests: what must never reach the upstream, and the gateway's own answers."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.headers import CLIENT_IP_HEADERS, OVERRIDE_HEADERS
from tests.conftest import MakeGateway, gateway_config
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
